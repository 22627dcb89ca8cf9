"""Engines: the parts of the TensorRT engine that do not need TensorRT, the ORT engine options,
and the GPU check script (which must fall back to the CPU and say so)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.engines.tensorrt import parse_inspector, profile_shapes
from pipeline.run import run_pipeline
from pipeline.schema import ConfigError, engine_config
from pipeline.validation import validate
from tests.conftest import compose_cfg

DATA = Path(__file__).parent / "data"


def test_profile_shapes_from_config():
    cfg = engine_config("tensorrt", None, min_batch=1, opt_batch=8, max_batch=32, min_seq=4, opt_seq=128, max_seq=256)
    shapes = profile_shapes(cfg, ["input_ids", "attention_mask"])
    assert shapes == {n: ((1, 4), (8, 128), (32, 256)) for n in ("input_ids", "attention_mask")}


def test_inspector_json_parsing_of_the_documented_10x_format():
    s = parse_inspector((DATA / "trt_inspector_sample.json").read_text())
    assert s["layout"] == "10.x"
    assert [r["precision"] for r in s["layers"]] == ["int64", "int8", "unknown", "fp16", "fp16", "fp16"]
    # The Myelin attention layer reads an Int8 tensor, but the inspector does not state the precision of the
    # GEMMs fused inside it: "unknown", never the lowest input dtype (which would count it as an INT8 GEMM).
    assert s["layers"][2]["fused"] and s["layers"][2]["inputs"] == ["int8", "fp16"]
    assert s["by_precision"] == {"int64": 1, "int8": 1, "unknown": 1, "fp16": 3}
    assert (s["gemm_layers"], s["gemm_int8"], s["gemm_unknown"]) == (3, 1, 1)
    assert s["gemm_by_precision"] == {"int8": 1, "unknown": 1, "fp16": 1}
    assert [t["name"] for t in s["io_tensors"]] == ["input_ids", "attention_mask", "token_type_ids", "logits"]
    names_only = parse_inspector({"Layers": ["a", "{ForeignNode[x...y]}"], "Bindings": []})
    assert names_only["by_precision"] == {"unknown": 2} and names_only["gemm_by_precision"] == {"unknown": 1}


def test_inspector_json_parsing_of_the_documented_11x_format():
    s = parse_inspector((DATA / "trt11_inspector_sample.json").read_text())
    assert s["layout"] == "11.x"
    assert s["io_tensors"] == [
        {"name": "input_ids", "mode": "Input", "dtype": "int64"},
        {"name": "attention_mask", "mode": "Input", "dtype": "int64"},
        {"name": "logits", "mode": "Output", "dtype": "fp32"},
    ]
    # Precision from the separate DataType field; a fused layer with only Int8 inputs is still "unknown";
    # an FP16 + FP32 elementwise layer is "mixed", not the lower of the two.
    assert [r["precision"] for r in s["layers"]] == ["int64", "int8", "unknown", "fp32", "fp16", "mixed"]
    assert s["gemm_by_precision"] == {"int8": 1, "unknown": 1, "fp16": 1}
    assert (s["gemm_int8"], s["gemm_fp8"], s["gemm_unknown"]) == (1, 0, 1)
    # DataType wins over the words of Format (11.x): the split fields are read as stated.
    one = {
        "Layers": [
            {
                "Name": "g",
                "LayerType": "CaskGemmMatrixMultiply",
                "Inputs": [{"Format": "Row major linear FP16 format", "DataType": "FP8"}] * 2,
            }
        ]
    }
    assert parse_inspector(one)["gemm_by_precision"] == {"fp8": 1}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error path of machines without a GPU")
def test_engine_tensorrt_fails_at_validation_with_the_exact_message(tmp_path):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("tensorrt is installed here")
    except ImportError:
        pass
    with pytest.raises(ConfigError) as e:
        run_pipeline(compose_cfg(["engine=tensorrt"]), tmp_path / "run")
    assert e.value.errors == [
        "engine=tensorrt: the tensorrt Python package is not installed; this engine targets TensorRT 11.x (10.x accepted); "
        "pip install tensorrt on a machine with an NVIDIA GPU",
        "engine=tensorrt: no CUDA GPU visible to torch; TensorRT engines build and run on NVIDIA GPUs only (use engine=onnxruntime here)",
    ]
    assert not (tmp_path / "run").exists()  # before any stage: nothing written


def test_tensorrt_profile_must_cover_benchmark_and_eval_shapes():
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg(["engine=tensorrt", "engine.max_batch=16", "benchmark.batch_sizes=[1,8,32]"]))
    assert e.value.errors == [
        "evaluate.batch_size: 64 is outside the TensorRT optimization profile (engine.max_batch=16)",
        "benchmark.batch_sizes: 32 is outside the TensorRT optimization profile (engine.max_batch=16)",
    ]


def test_unavailable_ort_provider_is_reported(tmp_path):
    with pytest.raises(ConfigError) as e:
        run_pipeline(compose_cfg(["engine=onnxruntime", "engine.providers=[TensorrtExecutionProvider]"]), tmp_path / "run")
    assert e.value.errors[0].startswith(
        "engine.providers: TensorrtExecutionProvider is not available in this onnxruntime build; available:"
    )


def _gpu_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "scripts/gpu_check.sh", *args],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent.parent,
        timeout=600,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
    )


def _table(out: str) -> dict[str, str]:
    """check name -> result, from the final table (the run's own summary comes before it)."""
    rows = out.split("| check ")[-1].splitlines()[2:]
    rows = [r for r in rows if r.startswith("| ")]
    return {r.split("|")[1].strip(): r.split("|")[2].strip() for r in rows}


def test_gpu_check_script_falls_back_to_cpu_and_prints_one_table(tmp_path):
    r = _gpu_check("--random-init", "--out", str(tmp_path))
    out = r.stdout
    assert r.returncode == 0, out[-3000:] + r.stderr[-3000:]
    table = _table(out)
    assert len(table) == 19 and set(table.values()) <= {"ok", "skipped"}, table
    asym = "asymmetric fake quant on device: CPU values, no host sync in forward/backward"
    for name in ("quantizer numerics on device == CPU", asym, "calibrators fed device tensors"):
        assert table[name] == "ok"
    assert table["TensorRT availability (engine=tensorrt validation)"] == "skipped"  # absent and not asked for: never "ok"
    n = {s: sum(v == s for v in table.values()) for s in ("ok", "skipped")}
    assert out.rstrip().splitlines()[-1] == f"summary: {n['ok']} ok, {n['skipped']} skipped, 0 failed"
    if not torch.cuda.is_available():
        assert "CPU FALLBACK: no CUDA GPU visible" in out
        assert table["CUDA device visible to torch"] == "skipped"
        assert table["ONNX Runtime CUDA provider"] == "skipped"
    metrics = json.loads((tmp_path / "smoke/metrics.json").read_text())
    assert metrics["stages"]["qat"]["status"] == "done"
    # The TensorRT graphs of the smoke run pass the static rules wherever the export wrote them.
    trt_graphs = "static TensorRT rules on the smoke run's TensorRT graphs"
    assert table[trt_graphs] == ("ok" if (tmp_path / "smoke/model_int8_trt.onnx").exists() else "skipped")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the missing-piece path of machines without a GPU")
def test_gpu_check_fails_when_a_required_piece_is_missing():
    r = _gpu_check("--only", "cuda,tensorrt", "--require-tensorrt", "--require-cuda")
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    table = _table(r.stdout)
    assert table == {"CUDA device visible to torch": "FAIL", "TensorRT availability (engine=tensorrt validation)": "FAIL"}
    assert "required (--require-tensorrt) but missing" in r.stdout
    assert r.stdout.rstrip().splitlines()[-1] == "summary: 0 ok, 0 skipped, 2 failed"


def test_interleaved_timing_takes_turns_and_bounds_warm_up_and_timed_rounds_by_time():
    """pipeline.timing.interleaved: every call in each round, in turn; `iters` rounds without a time limit; with
    one, warm-up stops after a quarter of it (at least one round) and timing after it (at least min_iters)."""
    import time

    from pipeline.timing import interleaved

    order: list[str] = []

    def call(label, seconds=0.0):
        def run():
            order.append(label)
            time.sleep(seconds)

        return run

    times = interleaved({"a": call("a"), "b": call("b")}, warmup=2, iters=5)
    assert order == ["a", "b"] * 7 and {k: len(v) for k, v in times.items()} == {"a": 5, "b": 5}
    order.clear()
    slow = interleaved({"a": call("a", 0.01), "b": call("b", 0.01)}, warmup=50, iters=100, max_seconds=0.2, min_iters=3)
    warm = len(order) - 2 * len(slow["a"])
    assert 2 <= warm <= 8  # ~0.05 s of warm-up (a quarter of 0.2 s) at 0.02 s a round, not 50 rounds
    assert 3 <= len(slow["a"]) <= 13 and len(slow["a"]) == len(slow["b"])  # ~0.2 s of timed rounds, not 100
    assert all(t >= 9.0 for t in slow["a"])  # milliseconds of a 10 ms call
