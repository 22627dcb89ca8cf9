"""Serving a run with the real Triton server: the tritonserver binary of PyPI's nvidia-pytriton in the
serving environment `.venv-serve` (created here when missing; the tests skip, saying why, only when it
cannot be created, e.g. without access to PyPI).

Tiny random models' repositories (written by the deploy stage): every config.pbtxt parsed with Triton's
own protobuf schema; eval texts through tritonclient HTTP equal the predictor's predictions, INT8 and
FP32; each bad request gets an error response (or, for a 100,000-character text, a truncated answer) and
the next valid request is answered; a bounded load test; `qdq-pipeline-serve` prints the endpoint and
stops with its Python stubs on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import pipeline.stages.deploy as deploy_stage
from pipeline.deploy.env import create_env, default_env_path, find_env, run_in_env
from pipeline.deploy.predictor import eval_records, load_predictor
from pipeline.deploy.server import TritonServer, free_port
from pipeline.schema import validate
from pipeline.testing import TINY, compose_cfg, run_tiny

DEPLOY = Path(deploy_stage.__file__).resolve().parents[1] / "deploy"


@pytest.fixture(scope="module")
def serve_env():
    env = find_env()
    if env is None:
        try:
            env = create_env()
        except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
            pytest.skip(f"the serving environment {default_env_path()} cannot be created here (no access to PyPI?): {exc}")
    env.prepare_backends()
    return env


def _deployed(root: Path, overrides: list[str] | None = None):
    """A tiny run with its Triton repository (the deploy stage called on the finished run's context)."""
    ctx = run_tiny(root, overrides)
    deploy_stage.run(validate(compose_cfg([*TINY, "deploy=triton", *(overrides or [])])), ctx)
    return ctx.run_dir


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory):
    return _deployed(tmp_path_factory.mktemp("serve_cls"))


def _server(env, repo: Path, log: Path) -> TritonServer:
    return TritonServer(repo, env, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(), log_file=log)


def _client(env, *args: str) -> str:
    r = run_in_env(env, DEPLOY / "triton_client.py", *args, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def _served(env, url: str, model: str, texts: list[str], tmp: Path) -> list[dict]:
    src, dst = tmp / f"{model}.in.jsonl", tmp / f"{model}.out.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    _client(env, "infer", url, model, str(src), str(dst), "--batch", "8")
    return [json.loads(line) for line in dst.read_text().splitlines()]


def test_every_config_pbtxt_parses_with_tritons_schema(serve_env, cls_run, tmp_path):
    r = run_in_env(serve_env, DEPLOY / "check_configs.py", str(cls_run / "triton" / "cpu"), str(cls_run / "triton" / "nvidia"))
    assert r.returncode == 0, r.stdout + r.stderr
    checked = json.loads(r.stdout)
    assert len(checked) == 6 + 10 and not any(checked.values())
    # The schema check is real: an unknown field and a wrong enum value are refused.
    bad = tmp_path / "bad" / "model_int8"
    bad.mkdir(parents=True)
    text = (cls_run / "triton" / "cpu" / "model_int8" / "config.pbtxt").read_text()
    (bad / "config.pbtxt").write_text(text.replace("max_batch_size:", "max_batch_sizes:"))
    r = run_in_env(serve_env, DEPLOY / "check_configs.py", str(bad.parent))
    assert r.returncode == 1 and "max_batch_sizes" in r.stdout
    (bad / "config.pbtxt").write_text(text.replace("KIND_CPU", "KIND_TPU"))
    r = run_in_env(serve_env, DEPLOY / "check_configs.py", str(bad.parent))
    assert r.returncode == 1 and "KIND_TPU" in r.stdout


@pytest.mark.slow
def test_served_predictions_equal_the_predictor_and_bad_requests_leave_it_serving(serve_env, cls_run, tmp_path):
    cfg_texts = [r["text"] for r in eval_records(validate(compose_cfg(TINY)))]
    info = json.loads((cls_run / "triton" / "deploy.json").read_text())
    server = _server(serve_env, cls_run / "triton" / "cpu", tmp_path / "tritonserver.log")
    with server:
        for name, precision in (("sequence_classification", "int8"), ("sequence_classification_fp32", "fp32")):
            assert info["repositories"]["cpu"][name]["precision"] == precision
            served = _served(serve_env, server.url, name, cfg_texts, tmp_path)
            offline = load_predictor(cls_run, precision).predict([{"text": t} for t in cfg_texts])
            assert [s["label"] for s in served] == [o["label"] for o in offline]
            np.testing.assert_allclose([s["scores"] for s in served], [o["scores"] for o in offline], atol=1e-5)
            assert not any(s["truncated"] for s in served)

        report = {r["case"]: r for r in json.loads(_client(serve_env, "bad", server.url, "sequence_classification", cfg_texts[0], "32"))}
        assert set(report) == {"empty_text", "invalid_utf8", "text_100k_chars", "wrong_input_name", "wrong_dtype", "batch_above_max"}
        assert all(r["next_valid_ok"] for r in report.values()), report
        assert "is empty" in report["empty_text"]["error"] and "[400]" in report["empty_text"]["error"]
        assert "not valid UTF-8" in report["invalid_utf8"]["error"]
        assert report["text_100k_chars"]["accepted"] and report["text_100k_chars"]["truncated"]  # cut to max_length, as measured
        assert "unexpected inference input 'TEXTS'" in report["wrong_input_name"]["error"]
        assert "expects 'BYTES'" in report["wrong_dtype"]["error"]
        assert "batch-size must be <= 32" in report["batch_above_max"]["error"]

        # A bounded load test against the same server: both precisions, every request answered.
        from pipeline import loadtest

        out = tmp_path / "lt"
        args = [server.url, "--run", str(cls_run), "--concurrency", "1,8", "--requests", "24", "--seconds", "10", "--out", str(out)]
        assert loadtest.main(args) == 0
        result = json.loads((out / "serving.json").read_text())
        cells = result["cells"]
        assert [(c["model"], c["concurrency"]) for c in cells] == [
            (m, c) for c in (1, 8) for m in ("sequence_classification_fp32", "sequence_classification")
        ]
        assert all(c["ok"] == 24 and c["errors"] == 0 and c["p99_ms"] >= c["p50_ms"] > 0 for c in cells)
        assert (out / "serving.png").stat().st_size > 10_000 and result["cpu"]
    assert not server.group_alive()  # the server and its Python stubs are gone
    assert loadtest.main(["http://10.0.0.1:8000", "--run", str(cls_run)]) == 2  # loopback only: nothing is sent


@pytest.mark.slow
def test_the_served_model_runs_the_runs_engine_openvino(serve_env, tmp_path):
    """A run on OpenVINO (what engine=auto picks on AMX CPUs) is served by OpenVINO in the Python backend,
    with the run's precision hints: the served INT8 and FP32 predictions equal the predictor's."""
    run = _deployed(tmp_path, ["engine=openvino"])
    info = json.loads((run / "triton" / "deploy.json").read_text())
    assert info["repositories"]["cpu"]["sequence_classification"]["backend"] == "python (OpenVINO)"
    cfg_texts = [r["text"] for r in eval_records(validate(compose_cfg(TINY)))][:32]
    with _server(serve_env, run / "triton" / "cpu", tmp_path / "tritonserver.log") as server:
        for name, precision in (("sequence_classification", "int8"), ("sequence_classification_fp32", "fp32")):
            served = _served(serve_env, server.url, name, cfg_texts, tmp_path)
            offline = load_predictor(run, precision).predict([{"text": t} for t in cfg_texts])
            assert [s["label"] for s in served] == [o["label"] for o in offline]
            np.testing.assert_allclose([s["scores"] for s in served], [o["scores"] for o in offline], atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["embedding", "token_classification"])
def test_served_embeddings_and_entities_equal_the_predictor(serve_env, task, tmp_path):
    run = _deployed(tmp_path, [f"task={task}"])
    records = eval_records(validate(compose_cfg(TINY + [f"task={task}"])), 24)
    texts = [r["text"] for r in records]
    offline = load_predictor(run).predict(records)
    with _server(serve_env, run / "triton" / "cpu", tmp_path / "tritonserver.log") as server:
        served = _served(serve_env, server.url, task, texts, tmp_path)
    if task == "embedding":
        np.testing.assert_allclose([s["sentence_embedding"] for s in served], [o["embedding"] for o in offline], atol=1e-5)
    else:
        strip = lambda ents: [(e["entity"], e["start"], e["end"], e["text"]) for e in ents]  # noqa: E731
        assert [strip(s["entities"]) for s in served] == [strip(o["entities"]) for o in offline]


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if text in (p / "cmdline").read_bytes().decode(errors="replace") and (p / "stat").read_text().split()[2] != "Z":
                    found.append(int(p.name))
            except OSError:
                pass
    return found


@pytest.mark.slow
def test_serve_cli_prints_the_endpoint_and_stops_cleanly_on_sigterm(serve_env, cls_run):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"QDQ_SERVE_VENV": str(serve_env.path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.serve", str(cls_run), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        deadline, lines = time.monotonic() + 180, []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "Triton ready" in line or proc.poll() is not None:
                break
        assert f"http://127.0.0.1:{port}" in lines[-1], "".join(lines)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=5) as r:
            assert r.status == 200
        repo = str(cls_run / "triton" / "cpu")
        assert len(_processes_mentioning(repo)) >= 5  # tritonserver + one Python stub per model
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        time.sleep(0.5)
        assert _processes_mentioning(repo) == []  # no orphans
    finally:
        if proc.poll() is None:
            proc.kill()
