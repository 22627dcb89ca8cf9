"""Stage cache keys: a result is reused only when the code, the library versions and (for measured
numbers) the very artifact bytes are the ones it was computed from."""

from __future__ import annotations

import onnx

import pipeline.cache as cache
import pipeline.run as run_module
import pipeline.stages.export as export_stage
from pipeline.outputs import atomic_write
from pipeline.testing import run_tiny

FAST = ["benchmark=none", "qat=none"]
CACHED_STAGES = ("finetune", "calibrate", "export", "evaluate")


def _status(ctx) -> dict[str, str]:
    return {k: ctx.stages[k].status for k in CACHED_STAGES}


def test_a_different_library_version_misses_every_entry(tmp_path, monkeypatch):
    run_tiny(tmp_path, FAST, name="first")
    real = cache.library_versions()
    assert set(real) == {"torch", "transformers", "onnx", "onnxruntime", "tensorrt", "numpy"} and real["torch"]
    monkeypatch.setattr(cache, "library_versions", lambda: {**real, "onnxruntime": "0.0.1"})
    upgraded = run_tiny(tmp_path, FAST, name="upgraded")
    assert set(_status(upgraded).values()) == {"done"}
    monkeypatch.undo()
    again = run_tiny(tmp_path, FAST, name="again")  # the original versions still find their entries
    assert set(_status(again).values()) == {"cached"}


def test_evaluate_is_not_reused_for_onnx_files_with_other_bytes(tmp_path, monkeypatch):
    first = run_tiny(tmp_path, FAST, name="first")
    real = export_stage.run

    def rebuilt(cfg, ctx):
        """The export entry is reused, then the INT8 graph is replaced by one with other bytes (as a
        rebuild by another exporter version would leave it); evaluate must measure it afresh."""
        status = real(cfg, ctx)
        model = onnx.load(str(ctx.path("model_int8.onnx")))
        model.doc_string = "rebuilt"
        atomic_write(ctx.path("model_int8.onnx"), lambda p: onnx.save(model, str(p)))  # new file: the cache's hard link stays intact
        return status

    monkeypatch.setattr(run_module, "STAGES", [(n, rebuilt if n == "export" else s, on) for n, s, on in run_module.STAGES])
    second = run_tiny(tmp_path, FAST, name="second")
    assert _status(second) == {"finetune": "cached", "calibrate": "cached", "export": "cached", "evaluate": "done"}
    monkeypatch.undo()
    third = run_tiny(tmp_path, FAST, name="third")  # the original bytes again: the original numbers
    assert _status(third)["evaluate"] == "cached" and third.metrics.accuracy == first.metrics.accuracy
