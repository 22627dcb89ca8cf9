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
from pipeline.schema import ConfigError, EngineConfig, validate
from tests.conftest import compose_cfg

DATA = Path(__file__).parent / "data"


def test_profile_shapes_from_config():
    cfg = EngineConfig(name="tensorrt", min_batch=1, opt_batch=8, max_batch=32, min_seq=4, opt_seq=128, max_seq=256)
    shapes = profile_shapes(cfg, ["input_ids", "attention_mask"])
    assert shapes == {n: ((1, 4), (8, 128), (32, 256)) for n in ("input_ids", "attention_mask")}


def test_inspector_json_parsing_of_the_documented_format():
    s = parse_inspector((DATA / "trt_inspector_sample.json").read_text())
    assert s["by_precision"] == {"int64": 1, "int8": 2, "fp16": 3}
    assert (s["gemm_layers"], s["gemm_int8"]) == (3, 2)  # query GEMM + Myelin attention in INT8; classifier FP16
    assert [r["precision"] for r in s["layers"]][:3] == ["int64", "int8", "int8"]
    names_only = parse_inspector({"Layers": ["a", "b"], "Bindings": []})
    assert names_only["by_precision"] == {"unknown": 2}


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
        "engine=tensorrt: the tensorrt Python package is not installed; pip install tensorrt (TensorRT 10+, needs network access "
        "to NVIDIA's index pypi.nvidia.com) on a machine with an NVIDIA GPU",
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
        run_pipeline(compose_cfg(["engine.providers=[TensorrtExecutionProvider]"]), tmp_path / "run")
    assert e.value.errors[0].startswith(
        "engine.providers: TensorrtExecutionProvider is not available in this onnxruntime build; available:"
    )


def test_gpu_check_script_falls_back_to_cpu_and_prints_one_table(tmp_path):
    r = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--random-init", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent.parent,
        timeout=600,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
    )
    out = r.stdout
    assert r.returncode == 0, out[-3000:] + r.stderr[-3000:]
    if not torch.cuda.is_available():
        assert "CPU FALLBACK: no CUDA GPU visible" in out
    table = out.split("| check ")[-1].splitlines()[2:]  # the final table (the run's own summary comes before it)
    assert len(table) == 6 and all("| ok     |" in line for line in table), table
    metrics = json.loads((tmp_path / "smoke/metrics.json").read_text())
    assert metrics["stages"]["qat"]["status"] == "done"
