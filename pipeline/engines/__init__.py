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


class Engine(Protocol):
    precision: str  # "fp32" | "int8" | "fp16"
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
