"""Inference engines built from the exported ONNX files (config group `engine`).

Each engine kind is a registry entry with:
  check(cfg) -> list[str]   problems found before any stage runs (missing package / GPU)
  build(onnx_path, precision, cfg, run_dir) -> Engine
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from pipeline.schema import EngineConfig

# How reports name each engine precision (report.md, the tasks' report rows).
PRECISION_NAMES = {"fp32": "FP32", "fp16": "FP16", "int8": "INT8", "fp8": "FP8"}


class Engine(Protocol):
    precision: str  # "fp32" | "fp16" (baselines) | "int8" | "fp8"
    emulated: bool  # True where the engine has no kernels for its precision (FP8 / FP16 on ORT CPU): not timed
    input_names: list[str]
    files: dict[str, Path]  # what the engine wrote (optimized graph, plan, inspector json)
    kernels: dict[str, int]  # op/layer type -> count in the built engine (int8 proof)

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """(batch, seq) int64 arrays by input name -> logits (batch, num_labels) float32."""
        ...

    def bind(self, inputs: dict[str, np.ndarray]) -> Callable[[], None]:
        """Place inputs where the engine reads them once; the call runs the engine (for timing)."""
        ...


@dataclass(frozen=True)
class EngineKind:
    check: Callable[[EngineConfig], list[str]]
    build: Callable[[Path, str, EngineConfig, Path], Engine]


def _onnxruntime() -> EngineKind:
    from pipeline.engines import onnxruntime as ort_engine

    return EngineKind(ort_engine.check, ort_engine.build)


def _tensorrt() -> EngineKind:
    from pipeline.engines import tensorrt as trt_engine

    return EngineKind(trt_engine.check, trt_engine.build)


ENGINES: dict[str, Callable[[], EngineKind]] = {"onnxruntime": _onnxruntime, "tensorrt": _tensorrt}

# The graphs each engine builds from, by precision label: the export stage writes them, build_engine
# reads them. The first entry is the baseline engine, the second the quantized one. TensorRT 11
# networks are strongly typed, so its baseline is the FP16 graph and its INT8 graph computes in FP16
# between Q/DQ (pipeline/engines/trt_graphs.py); ONNX Runtime CPU is fastest with FP32 + INT8 Q/DQ.
GRAPHS: dict[str, dict[str, dict[str, str]]] = {
    "onnxruntime": {
        "int8": {"fp32": "model_fp32.onnx", "int8": "model_int8.onnx"},
        "fp8": {"fp32": "model_fp32.onnx", "fp8": "model_fp8.onnx"},
    },
    "tensorrt": {
        "int8": {"fp16": "model_fp16.onnx", "int8": "model_int8_trt.onnx"},
        "fp8": {"fp16": "model_fp16.onnx", "fp8": "model_fp8.onnx"},
    },
    "none": {"int8": {"fp32": "model_fp32.onnx", "int8": "model_int8.onnx"}, "fp8": {"fp32": "model_fp32.onnx", "fp8": "model_fp8.onnx"}},
}
# What ONNX Runtime runs to check TensorRT's graphs on any machine (evaluate: accuracy.trt_graph_*).
TRT_GRAPHS = {
    "int8": {"trt_graph_fp16": "model_fp16.onnx", "trt_graph_int8": "model_int8_trt.onnx"},
    "fp8": {"trt_graph_fp16": "model_fp16.onnx"},
}
