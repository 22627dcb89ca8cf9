"""Exporter warnings are recorded and logged once per run folder, never silenced wholesale."""

from __future__ import annotations

import logging
import warnings

import torch

from pipeline import onnx_export


def _emit(path, count: int) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn(
            "You are using the legacy TorchScript-based ONNX export. Starting in PyTorch 2.9 ...", DeprecationWarning, stacklevel=1
        )
        for _ in range(count):  # the tracer repeats its warning once per layer
            warnings.warn(
                "Converting a tensor to a Python boolean might cause the trace to be incorrect.", torch.jit.TracerWarning, stacklevel=1
            )
    onnx_export._log_export_warnings(caught, path)


def test_export_warnings_are_logged_once_per_run_with_a_count(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pipeline.onnx_export")
    _emit(tmp_path / "run" / "model_fp32.onnx", 3)
    _emit(tmp_path / "run" / "model_int8.onnx", 3)  # same run: nothing new to say
    _emit(tmp_path / "other" / "model_fp32.onnx", 1)  # another run logs its own
    got = [(r.levelname, r.getMessage().split(" at ")[0]) for r in caplog.records]
    assert got == [
        ("INFO", "export model_fp32.onnx: DeprecationWarning x1"),  # named and understood: INFO
        ("WARNING", "export model_fp32.onnx: TracerWarning x3"),  # not on the list: WARNING
        ("INFO", "export model_fp32.onnx: DeprecationWarning x1"),
        ("WARNING", "export model_fp32.onnx: TracerWarning x1"),
    ]
    assert "Converting a tensor to a Python boolean" in caplog.records[1].getMessage()
