"""End to end: the whole pipeline on a tiny random model (fast) and on the embedded model (slow)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from safetensors.torch import load_file

from tests.conftest import run_tiny

FILES = [
    "manifest.json",
    "metrics.json",
    "quant_map.json",
    "config.resolved.yaml",
    "quantizers.safetensors",
    "model_fp32.onnx",
    "model_int8.onnx",
    "report.md",
    "finetuned/config.json",
    "loss_finetune.png",
    "benchmark.png",
]


def test_smoke_run_writes_the_output_contract(tmp_path):
    ctx = run_tiny(tmp_path)
    run = tmp_path / "run"
    for f in FILES:
        assert (run / f).exists(), f
    m = json.loads((run / "metrics.json").read_text())
    assert set(m) >= {"config_hash", "model", "task", "accuracy", "parity", "latency_ms", "speedup", "benchmark", "stages"}
    assert all(m["accuracy"][k] is not None for k in ("fp32", "fake_quant", "engine_fp32", "int8"))
    assert set(m["latency_ms"]) == {"fp32", "int8"} and set(m["latency_ms"]["int8"]) == {"p50", "p90", "p99"}
    assert {(r["batch"], r["seq"]) for r in m["benchmark"]["grid"]} == {(1, 16), (1, 32), (2, 16), (2, 32)}
    assert m["stages"]["qat"]["status"] == "done" and m["stages"]["report"]["status"] == "done"  # QAT is in the default run
    assert m["parity"]["argmax_agreement"] >= 0.9 and m["parity"]["cosine"] > 0.98
    # Every quantized GEMM (2 layers x 6 Linear + 2 x 2 attention matmuls) runs as an int8 kernel in ORT.
    k = m["quantization"]["engine_kernels"]["int8"]
    assert k.get("MatMulIntegerToFloat", 0) + k.get("QLinearMatMul", 0) == 16 and "MatMul" not in k
    man = json.loads((run / "manifest.json").read_text())
    assert man["status"] == "done" and man["seed"] == 42 and man["config_hash"] == m["config_hash"]
    assert set(man["versions"]) >= {"torch", "transformers", "onnx", "onnxruntime", "tensorrt"}
    qmap = json.loads((run / "quant_map.json").read_text())
    assert {r["role"] for r in qmap} == {"linear_input", "linear_weight", "attn_q", "attn_k", "attn_v", "attn_probs"}
    assert "accuracy engine INT8" in (run / "report.md").read_text()
    assert ctx.metrics.accuracy["int8"] == m["accuracy"]["int8"]
    # The INT8 engine's drop vs the FP32 engine, with its paired interval (same eval examples).
    d = m["sequence_classification"]["int8"]
    assert d["drop_pt"] == pytest.approx(100 * (m["accuracy"]["engine_fp32"] - m["accuracy"]["int8"])) and d["drop_ci95_pt"] >= 0
    assert "drop int8 vs engine FP32 (paired 95 % interval)" in (run / "report.md").read_text()


def _graph_bytes(path: Path) -> bytes:
    m = onnx.load(str(path))
    m.producer_version = ""  # metadata only
    return m.graph.SerializeToString()


def test_same_config_and_seed_give_the_same_results(tmp_path):
    a = run_tiny(tmp_path, name="a")
    b = run_tiny(tmp_path, name="b")
    assert a.metrics.accuracy == b.metrics.accuracy and a.metrics.parity == b.metrics.parity
    sa, sb = load_file(str(tmp_path / "a/quantizers.safetensors")), load_file(str(tmp_path / "b/quantizers.safetensors"))
    assert sa.keys() == sb.keys() and all((sa[k] == sb[k]).all() for k in sa)
    for f in ("model_fp32.onnx", "model_int8.onnx"):
        assert _graph_bytes(tmp_path / "a" / f) == _graph_bytes(tmp_path / "b" / f)
    assert a.config_hash == b.config_hash


def test_data_csv_end_to_end(tmp_path):
    import csv

    words = ["good", "great", "fine", "bad", "awful", "poor"]
    for name, n in (("train", 48), ("eval", 16)):
        with open(tmp_path / f"{name}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["review", "sentiment"])
            for i in range(n):
                w.writerow([f"this film is {words[i % 6]} {i}", "positive" if i % 6 < 3 else "negative"])
    ctx = run_tiny(
        tmp_path,
        [
            "data=csv",
            f"data.train_path={tmp_path}/train.csv",
            f"data.eval_path={tmp_path}/eval.csv",
            "data.text_column=review",
            "data.label_column=sentiment",
            "data.num_train=null",
            "data.num_eval=null",
            "benchmark.include_torch=true",
        ],
    )
    assert {r["precision"] for r in ctx.metrics.benchmark["grid"]} == {"fp32", "int8", "torch_fp32", "torch_fake_quant"}
    assert ctx.splits.label_names == ["negative", "positive"] and len(ctx.splits.eval) == 16
    assert ctx.metrics.accuracy["int8"] is not None


def test_switched_off_stages_are_recorded_skipped(tmp_path):
    ctx = run_tiny(tmp_path, ["finetune=none", "calibration=none", "qat=none", "engine=none", "export=none", "benchmark=none"])
    status = {k: v.status for k, v in ctx.stages.items()}
    assert status == {
        "load": "done",
        "finetune": "skipped",
        "calibrate": "skipped",
        "tune": "skipped",
        "qat": "skipped",
        "export": "skipped",
        "build_engine": "skipped",
        "evaluate": "done",
        "benchmark": "skipped",
        "deploy": "skipped",
        "report": "done",
    }
    assert ctx.metrics.accuracy["fp32"] is not None and ctx.metrics.accuracy["int8"] is None


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def test_failed_run_never_touches_an_earlier_run(tmp_path):
    from tests.conftest import TINY

    earlier = tmp_path / "earlier"
    r = _cli(*TINY, f"hydra.run.dir={earlier}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    before = _tree_digest(earlier)
    # 1) a new run pointed at the same folder is refused before Hydra writes anything there
    r = _cli(*TINY, f"hydra.run.dir={earlier}", cwd=tmp_path)
    assert r.returncode != 0 and "already holds a run; refusing to overwrite it" in r.stderr
    # 2) a run failing mid-way (a model folder with no checkpoint in it, found by the load stage) fails in its own folder only
    (tmp_path / "empty_model").mkdir()
    r = _cli(
        *TINY, "model.random_init=false", f"model.name_or_path={tmp_path}/empty_model", f"hydra.run.dir={tmp_path}/failing", cwd=tmp_path
    )
    assert r.returncode != 0
    manifest = json.loads((tmp_path / "failing/manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["stages"]["load"]["status"] == "failed"
    # 3) a config error stops before any stage
    r = _cli(*TINY, "calibration.percentile=101", f"hydra.run.dir={tmp_path}/invalid", cwd=tmp_path)
    assert r.returncode != 0 and "calibration.percentile: 101.0 out of range; must be in [0.0, 100.0]" in r.stderr
    assert not (tmp_path / "invalid").exists()
    assert _tree_digest(earlier) == before


@pytest.mark.slow
def test_smoke_on_the_embedded_model(tmp_path):
    """Real MiniLM-L6 weights, real movie snippets, experiment=smoke: every GEMM int8 in ORT."""
    from pipeline.run import run_pipeline
    from tests.conftest import compose_cfg

    # peers off: they have their own end-to-end test (tests/test_peers.py); this one checks the real model's graph
    ctx = run_pipeline(compose_cfg(["experiment=smoke", "benchmark.iters=2", "engine=onnxruntime", "benchmark.peers=[]"]), tmp_path / "run")
    k = ctx.metrics.quantization.engine_kernels["int8"]
    assert k["MatMulIntegerToFloat"] + k["QLinearMatMul"] == 6 * 6 + 6 * 2  # 36 Linear + 12 attention matmuls
    assert ctx.metrics.parity["cosine"] > 0.95
    assert ctx.metrics.accuracy["engine_fp32"] == pytest.approx(ctx.metrics.accuracy["fp32"], abs=0.01)
