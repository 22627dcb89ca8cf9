"""What every engine shares: the Engine protocol, the registry entry, which graph files each engine
builds from, and the CPU facts that decide int8 weight ranges."""

from __future__ import annotations

import platform
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
    weight_range: Callable[[EngineConfig], tuple[str, str]]


# The graphs each engine builds from, by precision label: the export stage writes them, build_engine
# reads them. The first entry is the baseline engine, the second the quantized one. TensorRT 11
# networks are strongly typed, so its baseline is the FP16 graph and its INT8 graph computes in FP16
# between Q/DQ (pipeline/engines/trt_graphs.py); ONNX Runtime CPU is fastest with FP32 + INT8 Q/DQ.
GRAPHS: dict[str, dict[str, dict[str, str]]] = {
    "onnxruntime": {
        "int8": {"fp32": "model_fp32.onnx", "int8": "model_int8.onnx"},
        "fp8": {"fp32": "model_fp32.onnx", "fp8": "model_fp8.onnx"},
    },
    # OpenVINO reads the same ONNX files as ONNX Runtime. Its CPU plugin reads FP8 Q/DQ correctly but has no
    # FP8 GEMM (weights decompressed, FullyConnected in f32/bf16): the fp8 engine is emulated, not timed.
    "openvino": {
        "int8": {"fp32": "model_fp32.onnx", "int8": "model_int8.onnx"},
        "fp8": {"fp32": "model_fp32.onnx", "fp8": "model_fp8.onnx"},
    },
    "tensorrt": {
        "int8": {"fp16": "model_fp16.onnx", "int8": "model_int8_trt.onnx"},
        "fp8": {"fp16": "model_fp16.onnx", "fp8": "model_fp8.onnx"},
    },
}
# What ONNX Runtime runs to check TensorRT's graphs on any machine (evaluate: accuracy.trt_graph_*).
TRT_GRAPHS = {
    "int8": {"trt_graph_fp16": "model_fp16.onnx", "trt_graph_int8": "model_int8_trt.onnx"},
    "fp8": {"trt_graph_fp16": "model_fp16.onnx"},
}


# CPU features with which x86 int8 GEMMs accumulate u8 x s8 products without int16 saturation (VNNI dot
# products, AMX tiles). Without them ONNX Runtime's and OpenVINO's kernels sum pairs of products in int16
# (vpmaddubsw) and saturate once |weight| > 64: such CPUs need 7-bit weights (quant.weight_range=reduced).
NO_SATURATION_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def cpu_flags() -> set[str] | None:
    """This machine's CPU feature flags (/proc/cpuinfo), None where unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}


def cpu_model_name() -> str:
    """The CPU's model name (/proc/cpuinfo "model name"), recorded beside every timing."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def x86_int8_saturation(engine: str, flags: set[str] | None = None, machine: str | None = None) -> tuple[str, str]:
    """("reduced" | "full", why) for an x86 CPU engine whose int8 GEMMs saturate without VNNI."""
    machine = machine or platform.machine()
    if machine.lower() not in ("x86_64", "amd64", "i386", "i686"):
        return "full", f"{machine} CPU: {engine}'s int8 kernels there do not saturate (an x86 pre-VNNI effect)"
    flags = cpu_flags() if flags is None else flags
    if flags is None:
        return "full", "CPU features unknown (no /proc/cpuinfo); set quant.weight_range=reduced on an x86 CPU without VNNI"
    have = [f for f in NO_SATURATION_FLAGS if f in flags]
    if have:
        return "full", f"x86 CPU with {have[0]}: {engine}'s int8 dot products accumulate without saturation"
    return (
        "reduced",
        f"x86 CPU without VNNI (no avx512_vnni / avx_vnni / amx_int8): {engine}'s u8 x s8 int16 pairs saturate beyond |w| = 64",
    )
