"""Deployment of a finished run (the `deploy` stage and the serving commands).

- predictor.py   load a run folder, predict with its engine (tokenization as measured, the task's output)
- textproc.py    text -> engine inputs with the `tokenizers` library alone (also inside Triton)
- postprocess.py engine output -> the task's answer, per task (also inside Triton)
- triton.py      the Triton model repository (ensemble tokenizer -> model -> postprocess per precision)
- env.py         the serving environment .venv-serve (tritonserver from PyPI's nvidia-pytriton)
- server.py      start / stop tritonserver on 127.0.0.1, process group and all
- loadtest.py    bounded loopback load test (throughput, p50 / p99 vs concurrency)
- check_configs.py, triton_client.py   standalone scripts run with the serving environment's Python
- triton_models/ the Python-backend model.py files copied into each repository
"""
