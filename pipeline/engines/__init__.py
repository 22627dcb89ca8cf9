"""Inference engines built from the exported ONNX files (config group `engine`).

Each engine kind is a registry entry (pipeline/engines/base.py EngineKind):
  check(cfg) -> list[str]                 problems found before any stage runs (missing package / GPU)
  build(onnx_path, precision, cfg, run_dir) -> Engine
  weight_range(cfg) -> (full | reduced, why)   quant.weight_range=auto for this engine on this machine
"""

from __future__ import annotations

from collections.abc import Callable

from pipeline.engines.base import GRAPHS, PRECISION_NAMES, TRT_GRAPHS, Engine, EngineKind, cpu_flags
from pipeline.schema import EngineConfig

__all__ = ["ENGINES", "GRAPHS", "PRECISION_NAMES", "TRT_GRAPHS", "Engine", "EngineKind", "auto_engine", "graphs_for"]


def _onnxruntime() -> EngineKind:
    from pipeline.engines import onnxruntime as ort_engine

    return EngineKind(ort_engine.check, ort_engine.build, ort_engine.weight_range_for)


def _openvino() -> EngineKind:
    from pipeline.engines import openvino as ov_engine

    return EngineKind(ov_engine.check, ov_engine.build, ov_engine.weight_range_for)


def _tensorrt() -> EngineKind:
    from pipeline.engines import tensorrt as trt_engine

    return EngineKind(trt_engine.check, trt_engine.build, lambda cfg: ("full", "TensorRT's int8 kernels have no int16 saturation"))


ENGINES: dict[str, Callable[[], EngineKind]] = {"onnxruntime": _onnxruntime, "openvino": _openvino, "tensorrt": _tensorrt}


def graphs_for(cfg: EngineConfig, fmt: str) -> dict[str, str]:
    """The graphs engine `cfg` builds from, baseline first; ONNX Runtime led by its TensorRT provider takes
    TensorRT's graphs (signed INT8 Q/DQ; TensorRT's parser refuses model_int8.onnx's UINT8 softmax output)."""
    if cfg.name == "onnxruntime":
        from pipeline.engines.onnxruntime import provider_graphs

        return provider_graphs(cfg, fmt) or GRAPHS["onnxruntime"][fmt]
    return GRAPHS.get(cfg.name, GRAPHS["onnxruntime"])[fmt]  # engine=none: the CPU graphs, for accuracy only


# CPUs where OpenVINO ran this project's model_int8.onnx faster than ONNX Runtime at every grid cell, measured
# (docs/results/openvino.md): AMX (Xeon Sapphire Rapids class) and AVX-512 VNNI without AMX (AMD EPYC Zen 4 class).
# CPU flag -> the measurement; checked in this order.
OPENVINO_FLAGS = {
    "amx_int8": "OpenVINO measured 2.1x faster than ONNX Runtime on model_int8.onnx there (Xeon, b8 x s128)",
    "avx512_vnni": "OpenVINO measured 1.41x faster than ONNX Runtime on model_int8.onnx there (EPYC, b8 x s128)",
}


def auto_engine(flags: set[str] | None = None) -> tuple[str, str]:
    """engine=auto: (the CPU engine to use, why), by a rule measured on real CPUs (docs/results/openvino.md).

    OpenVINO ran this project's own model_int8.onnx faster than ONNX Runtime at every grid cell on the two
    CPUs measured: 2.1x at batch 8 x seq 128 on an Intel Xeon with AMX, 1.41x on an AMD EPYC with AVX-512
    VNNI and no AMX. Elsewhere (AVX2 only, AVX-VNNI, ARM) it has not been measured against ONNX Runtime,
    so the engine measured there stays.
    """
    flags = cpu_flags() if flags is None else flags
    hit = next((f for f in OPENVINO_FLAGS if flags and f in flags), None)
    if hit is None:
        return "onnxruntime", "CPU without AMX or AVX-512 VNNI: OpenVINO not measured faster than ONNX Runtime on such CPUs yet"
    try:
        import openvino  # noqa: F401
    except ImportError:
        return "onnxruntime", f"CPU with {hit}, but the openvino package is not installed"
    return "openvino", f"CPU with {hit}: {OPENVINO_FLAGS[hit]}"
