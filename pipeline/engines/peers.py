"""Peers: other quantizers (ONNX Runtime's, NNCF's) applied to the run's `model_fp32.onnx`, and the other
float engines of this CPU, as comparison rows.

A user's first question is "why not call ONNX Runtime's quantize_static, or NNCF, on my FP32 model?".
Every run answers it on the user's own model and data: each peer is built from the run's FP32 graph
through that tool's public API, evaluated on the same eval split and timed interleaved with the
project's engines on the same grid (benchmark.peers; CPU engines only). The float peers (ov_fp32,
ov_bf16, ov_fp16, ort_fp32_fused) make the speed claim honest: the report compares the INT8 engine with
the fastest float engine on this CPU, not only with ONNX Runtime FP32.

Settings follow each tool's guidance for x86 CPUs: u8 activations, s8 per-channel weights, and 7-bit
weights (ONNX Runtime reduce_range, NNCF overflow_fix) on CPUs without VNNI, the same decision
`quant.weight_range=auto` makes for this project's graph, so both sides get the same treatment on the
machine at hand. quantize_static: QDQ on the GEMM inputs only, u8 asymmetric activations, MinMax on the
run's own calibration examples (s8 symmetric lost 2-4 pt; Entropy matched MinMax at many times the
cost, measured on the default run).
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
    int8_onnx: Path | None = None  # this run's model_int8.onnx (the rows of our graph on the other CPU engine)


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


def nncf_ptq(p: PeerInputs) -> Path:
    """nncf.quantize on the OpenVINO model of p.fp32_onnx -> p.out_dir / "nncf_ptq.xml" (+ .bin).

    Settings, from NNCF's documentation of `nncf.quantize` for transformers (the same call Optimum-Intel
    makes for OVQuantizer full int8 quantization):
    - model_type=TRANSFORMER: transformer-specific quantizer placement (no quantizers on the add / norm
      branches, symmetric activations for matmuls between activations) and SmoothQuant on MatMuls
      (NNCF's default alpha 0.95 for transformers).
    - preset=MIXED: symmetric per-channel s8 weights, asymmetric activations: NNCF's documented default
      for model_type=TRANSFORMER, stated here so an NNCF default change does not silently change the row.
    - subset_size = every calibration feed of the run (NNCF's default of 300 would stop short or ask
      for more than there is); one feed is one batch, as in the ONNX Runtime quantize_static peer.
    - fast_bias_correction=True (NNCF's default).
    - overflow_fix: ENABLE (7-bit weights) when p.reduce_range, i.e. on x86 CPUs without VNNI, where
      OpenVINO's int8 FullyConnected saturates with full-range weights (measured: engines.openvino.
      weight_range_for); DISABLE otherwise. NNCF's own default (FIRST_LAYER) only protects the first
      Convolution, which a transformer encoder does not have. Same treatment as the project's graph
      and the ONNX Runtime peers on the machine at hand.
    """
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    from pipeline.engines.openvino import save_ir

    model = ov.Core().read_model(str(p.fp32_onnx))
    names = [i.get_any_name() for i in model.inputs]
    feeds = [{k: feed[k] for k in names} for feed in p.calibration()]
    if not feeds:
        raise ValueError("nncf_ptq: no calibration feeds")
    quantized = nncf.quantize(
        model,
        nncf.Dataset(feeds),
        model_type=nncf.ModelType.TRANSFORMER,
        preset=nncf.QuantizationPreset.MIXED,
        subset_size=len(feeds),
        fast_bias_correction=True,
        advanced_parameters=AdvancedQuantizationParameters(overflow_fix=OverflowFix.ENABLE if p.reduce_range else OverflowFix.DISABLE),
    )
    out = save_ir(quantized, p.out_dir / "nncf_ptq.xml")
    log.info("nncf_ptq: %s (%d calibration feeds, overflow_fix=%s)", out, len(feeds), "enable" if p.reduce_range else "disable")
    return out


def our_int8_graph(p: PeerInputs) -> Path:
    """This run's own model_int8.onnx, for the CPU engine the run did not choose (its row stays in the report)."""
    if p.int8_onnx is None:
        raise ValueError("this run exported no model_int8.onnx")
    return p.int8_onnx


def fp32_graph(p: PeerInputs) -> Path:
    """The run's own FP32 graph, for the float engines built with other settings (OpenVINO f32 / bf16 / f16)."""
    return p.fp32_onnx


@dataclass(frozen=True)
class Peer:
    build: Callable[[PeerInputs], Path]  # the graph (or OpenVINO IR) the peer runs
    precision: str  # what its GEMMs compute in: int8, or a float baseline (fp32 / bf16 / fp16)
    description: str  # one line for the report
    engine: str = "onnxruntime"  # the engine that runs it
    settings: tuple[tuple[str, object], ...] = ()  # engine config keys set for this peer
    ours: bool = False  # this project's graph on another engine: skipped when it is the run's own engine
    # What its recipe does that can cost accuracy: printed when the peer ends > 2 pt below the baseline.
    caveat: str = ""

    def is_the_runs_own(self, engine: str) -> bool:
        """The run's own row under another name (skipped): our INT8 graph on the run's engine, or the run's FP32
        graph in f32 on it (engine=openvino's baseline is model_fp32.onnx in f32: ov_fp32)."""
        return self.engine == engine and (self.ours or (self.build is fp32_graph and self.precision == "fp32"))


# Peers: other people's ways to the same goal (ONNX Runtime's and NNCF's quantizers) and the other float
# engines this CPU offers (the strongest float baseline is the fastest of them, metrics speedup_vs_best_float).
PEERS: dict[str, Peer] = {
    "ort_fp32_fused": Peer(ort_fp32_fused, "fp32", "FP32 + ONNX Runtime transformer fusions (optimize_model)"),
    "ort_dynamic": Peer(
        ort_dynamic,
        "int8",
        "ONNX Runtime quantize_dynamic, per-channel s8 weights",
        caveat="activations quantized per tensor to u8 at run time from each batch's min/max: an outlier token widens every step",
    ),
    "ort_dynamic_fused": Peer(
        ort_dynamic_fused,
        "int8",
        "quantize_dynamic on the fused graph (QAttention)",
        caveat="as ort_dynamic, and QAttention quantizes the Q/K/V projection inputs with one shared per-batch range",
    ),
    "ort_static": Peer(
        ort_static,
        "int8",
        "ONNX Runtime quantize_static, QDQ on MatMul/Gemm inputs, u8 asym activations, MinMax",
        caveat="MinMax ranges (no percentile clipping) on a few calibration batches: LayerNorm outputs with outlier "
        "channels get coarse steps; a LayerNorm output read by one MatMul and the residual Add shares its Q/DQ pair, "
        "so the residual stream is rounded too",
    ),
    "nncf_ptq": Peer(
        nncf_ptq,
        "int8",
        "NNCF post-training quantization (model_type=TRANSFORMER, SmoothQuant) on OpenVINO",
        "openvino",
        # Optimum-Intel compiles NNCF models with the plugin's own float precision: the peer keeps it whatever
        # engine.inference_precision this run's engine uses.
        (("inference_precision", "default"),),
        caveat="NNCF's MinMax-based ranges and SmoothQuant alpha 0.95 on the run's calibration batches, no QAT",
    ),
    "int8_onnxruntime": Peer(our_int8_graph, "int8", "this run's model_int8.onnx on ONNX Runtime", ours=True),
    "int8_openvino": Peer(our_int8_graph, "int8", "this run's model_int8.onnx on OpenVINO", "openvino", ours=True),
    "ov_fp32": Peer(fp32_graph, "fp32", "OpenVINO, model_fp32.onnx in f32", "openvino", (("inference_precision", "f32"),)),
    "ov_bf16": Peer(
        fp32_graph,
        "bf16",
        "OpenVINO, model_fp32.onnx in bf16 (CPUs with AMX / AVX512_BF16)",
        "openvino",
        (("inference_precision", "bf16"),),
    ),
    "ov_fp16": Peer(
        fp32_graph,
        "fp16",
        "OpenVINO, model_fp32.onnx in f16 (CPUs with AVX512_FP16 / AMX-FP16)",
        "openvino",
        (("inference_precision", "f16"),),
    ),
}
FLOAT_PRECISIONS = ("fp32", "bf16", "fp16")


def build_peers(names: list[str], inputs: PeerInputs, build_engine: Callable[[Peer, Path], object]) -> tuple[dict, list[dict]]:
    """Build each peer's graph and engine (`build_engine(peer, path)`). Returns (engines by name, metrics rows).

    A peer that fails to build is a row with its error (the quantizers do not support every graph, a CPU
    lacks bf16), never a failed run.
    """
    inputs.out_dir.mkdir(parents=True, exist_ok=True)
    inputs = dataclasses.replace(
        inputs,
        fp32_onnx=inputs.fp32_onnx.resolve(),
        out_dir=inputs.out_dir.resolve(),
        int8_onnx=inputs.int8_onnx.resolve() if inputs.int8_onnx is not None else None,
    )
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


def _build_one(name: str, inputs: PeerInputs, build_engine: Callable[[Peer, Path], object], engines: dict) -> dict:
    peer = PEERS[name]
    row = {
        "name": name,
        "description": peer.description,
        "precision": peer.precision,
        "engine": peer.engine,
        "file": None,
        "accuracy": None,
        "error": None,
        "grid": [],
    }
    t0 = time.perf_counter()
    try:
        path = peer.build(inputs)
        engine = build_engine(peer, path)
        row["file"] = os.path.relpath(path, inputs.out_dir.parent)
        row["kernels"] = getattr(engine, "kernels", {})
        engines[name] = engine  # only once its row is complete
    except Exception as exc:  # a peer's own failure is a result, reported in its row
        row["error"] = f"{type(exc).__name__}: {exc}"
        log.warning("peer %s failed to build: %s", name, row["error"])
    row["build_seconds"] = round(time.perf_counter() - t0, 2)
    return row
