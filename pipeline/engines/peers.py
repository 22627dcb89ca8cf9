"""Peers: ONNX Runtime's own quantizers applied to the run's `model_fp32.onnx`, as comparison rows.

A user's first question is "why not call ONNX Runtime's quantize_dynamic / quantize_static on my FP32
ONNX?". Every run answers it on the user's own model and data: each peer below is built from the
run's FP32 graph through ONNX Runtime's public API, then evaluated on the same eval split and timed
interleaved with the project's engines on the same grid (benchmark.peers, ONNX Runtime engine only).

Settings follow ONNX Runtime's own guidance for x86 CPUs (docstring of `quantize_static`): u8
activations, s8 weights, and `reduce_range=True` (7-bit weights) on CPUs without VNNI, the same
decision `quant.weight_range=auto` makes for this project's graph (engines.onnxruntime.weight_range_for),
so both sides get the same treatment on the machine at hand. Per-channel weights everywhere.
quantize_static uses QDQ with u8 asymmetric activations and MinMax calibration: the best of ORT's
static variants measured on the default run (s8 symmetric lost 2-4 pt and was no faster than FP32;
Entropy matched MinMax's accuracy at many times the calibration cost), on the run's own calibration
examples.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.engines.onnxruntime import transformer_fusions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PeerInputs:
    """What a peer builder needs: the FP32 graph, where to write, the model's shape, calibration feeds."""

    fp32_onnx: Path
    out_dir: Path
    num_heads: int
    hidden_size: int
    reduce_range: bool
    calibration: Callable[[], Iterable[dict[str, np.ndarray]]]  # fresh iterator of feeds per call


def _fused_fp32(p: PeerInputs) -> Path:
    out = p.out_dir / "ort_fp32_fused.onnx"
    if not out.exists():  # shared by ort_fp32_fused and ort_dynamic_fused
        transformer_fusions(p.fp32_onnx, out, p.num_heads, p.hidden_size)
    return out


def _dynamic(src: Path, out: Path, reduce_range: bool) -> Path:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # DefaultTensorType: ONNX shape inference cannot type the outputs of ORT's contrib ops (Attention,
    # SkipLayerNormalization) in the fused graph; they are float, as ORT's error message suggests.
    extra = {"DefaultTensorType": onnx.TensorProto.FLOAT}
    quantize_dynamic(str(src), str(out), per_channel=True, reduce_range=reduce_range, weight_type=QuantType.QInt8, extra_options=extra)
    return out


def ort_fp32_fused(p: PeerInputs) -> Path:
    return _fused_fp32(p)


def ort_dynamic(p: PeerInputs) -> Path:
    return _dynamic(p.fp32_onnx, p.out_dir / "ort_dynamic.onnx", p.reduce_range)


def ort_dynamic_fused(p: PeerInputs) -> Path:
    # On the fused graph, quantize_dynamic turns the Attention node into QAttention.
    return _dynamic(_fused_fp32(p), p.out_dir / "ort_dynamic_fused.onnx", p.reduce_range)


def ort_static(p: PeerInputs) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(p.calibration())

        def get_next(self):
            return next(self.it, None)

    # ORT's recommended pre-processing (graph optimizations + ONNX shape inference). Its symbolic shape
    # inference stops on the exported attention-mask arithmetic ("Incomplete symbolic shape inference"),
    # so it is skipped: ONNX's own shape inference types every tensor quantize_static needs.
    pre = p.out_dir / "ort_static_preprocessed.onnx"
    quant_pre_process(str(p.fp32_onnx), str(pre), skip_symbolic_shape=True)
    out = p.out_dir / "ort_static.onnx"
    quantize_static(
        str(pre),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        reduce_range=p.reduce_range,
        # MinMax's augmented graph returns one ReduceMin / ReduceMax per tensor and batch, so memory stays
        # small without CalibMaxIntermediateOutputs, which must not be set: in onnxruntime 1.32 it discards
        # every full group of collected batches without merging their ranges (MinMaxCalibrater.collect_data),
        # and raises "No data is collected." when the batch count is a multiple of it.
        calibrate_method=CalibrationMethod.MinMax,
        # Only the GEMMs: they are where ORT CPU has int8 kernels. By default quantize_static also puts
        # Q/DQ on Add / Mul / Gather / Transpose / Where ..., which quantized MPNet's relative-position
        # bucket arithmetic (log(0) = -inf -> a NaN scale -> garbage Gather indices at run time).
        op_types_to_quantize=list(STATIC_OPS),
        # A tensor read by a MatMul and by something else (the residual stream feeds Q/K/V and the
        # residual Add) gets its own Q/DQ pair per consumer: shared, the Add would read the quantized
        # copy and the residual stream would be rounded to 8 bits in every layer.
        # (ORT does so only where several quantized nodes read the tensor; a LayerNorm output read by one
        # MatMul and the residual Add still shares its pair.) GEMM outputs stay float: quantizing them
        # (the default) rounds every pre-bias activation to u8 on a MinMax range.
        extra_options={"DedicatedQDQPair": True, "OpTypesToExcludeOutputQuantization": list(STATIC_OPS)},
    )
    pre.unlink(missing_ok=True)
    return out


# What ort_static quantizes (see ort_static).
STATIC_OPS = ("MatMul", "Gemm")


# name -> (builder, precision the peer computes its GEMMs in, one-line description for the report).
PEERS: dict[str, tuple[Callable[[PeerInputs], Path], str, str]] = {
    "ort_fp32_fused": (ort_fp32_fused, "fp32", "FP32 + ONNX Runtime transformer fusions (optimize_model)"),
    "ort_dynamic": (ort_dynamic, "int8", "ONNX Runtime quantize_dynamic, per-channel s8 weights"),
    "ort_dynamic_fused": (ort_dynamic_fused, "int8", "quantize_dynamic on the fused graph (QAttention)"),
    "ort_static": (ort_static, "int8", "ONNX Runtime quantize_static, QDQ u8 asym activations, MinMax"),
}


def build_peers(names: list[str], inputs: PeerInputs, build_engine: Callable[[Path, str], object]) -> tuple[dict, list[dict]]:
    """Build each peer's graph and engine. Returns (engines by name, metrics rows).

    A peer that fails to build is a row with its error (ONNX Runtime's quantizers do not support every
    graph), never a failed run.
    """
    inputs.out_dir.mkdir(parents=True, exist_ok=True)
    inputs = dataclasses.replace(inputs, fp32_onnx=inputs.fp32_onnx.resolve(), out_dir=inputs.out_dir.resolve())
    engines, rows = {}, []
    with tempfile.TemporaryDirectory() as scratch, _cwd(scratch):
        for name in names:
            rows.append(_build_one(name, inputs, build_engine, engines))
    return engines, rows


@contextlib.contextmanager
def _cwd(path: str):
    """ONNX Runtime's quantization tools drop external-data files named <uuid>.data into the current
    folder while they save temporary models; they land in a scratch folder that is then removed."""
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _build_one(name: str, inputs: PeerInputs, build_engine: Callable[[Path, str], object], engines: dict) -> dict:
    builder, precision, description = PEERS[name]
    row = {"name": name, "description": description, "precision": precision, "file": None, "accuracy": None, "error": None, "grid": []}
    t0 = time.perf_counter()
    try:
        path = builder(inputs)
        engines[name] = build_engine(path, precision)
        row["file"] = str(path.relative_to(inputs.out_dir.parent))
        row["kernels"] = getattr(engines[name], "kernels", {})
    except Exception as exc:  # a peer's own failure is a result, reported in its row
        row["error"] = f"{type(exc).__name__}: {exc}"
        log.warning("peer %s failed to build: %s", name, row["error"])
    row["build_seconds"] = round(time.perf_counter() - t0, 2)
    return row
