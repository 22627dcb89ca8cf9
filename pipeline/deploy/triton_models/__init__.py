"""Triton Python-backend models, copied into each model repository as `<model>/1/model.py` (they import
`triton_python_backend_utils`, which exists only inside Triton's Python backend stub; never imported
by the package). Each is self-contained: the files it reads (textproc.py, postprocess.py, tokenizer.json,
settings) are copied beside it by pipeline/deploy/triton.py."""
