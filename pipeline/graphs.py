"""The graphs engines build from, made from a torch model (library layer; the export stage and the
tuner's latency probe call these, so both write byte-identical graphs).

- model_fp32.onnx: the FP32 baseline (ONNX Runtime, OpenVINO).
- model_int8.onnx: INT8 Q/DQ for CPU engines: int8 weights + DQ, dedicated Q/DQ pairs, P (softmax
  output) unsigned (0..255), FP32 elsewhere.
- model_fp16.onnx, model_int8_trt.onnx, model_fp8.onnx: TensorRT's strongly typed graphs
  (pipeline/engines/trt_graphs.py).

Every quantized graph comes from one Q/DQ export of the fake-quant model (FP32 weights + Q), converted
per target, so each format quantizes the FP32 weights once.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from pipeline.engines import trt_graphs
from pipeline.onnx_export import count_qdq, dedicate_qdq, export, fold_weight_quantization, rewrite

# Every graph file a run can hold, in the order the export stage writes them.
FILES = ("model_fp32.onnx", "model_int8.onnx", "model_fp16.onnx", "model_int8_trt.onnx", "model_fp8.onnx")


def export_fp32(fp32: torch.nn.Module, example: dict, dest: Path, opset: int, device: torch.device) -> Path:
    """The FP32 baseline graph of the FP32 model."""
    attn = fp32.config._attn_implementation
    # Eager attention for the FP32 graph: SDPA exports with IsNaN/Where guards that cost ~10 % of the
    # FP32 engine's time on ORT CPU; the baseline should be the fastest honest FP32 graph.
    fp32.set_attn_implementation("eager")
    try:
        export(fp32.cpu(), example, dest, opset)
    finally:  # the model goes on as it was, export or not (the tuner's probe survives a failed export)
        fp32.set_attn_implementation(attn)
        fp32.to(device)
    return dest


def baseline_graph(fp32: torch.nn.Module, example: dict, name: str, dest_dir: Path, opset: int, device: torch.device) -> Path:
    """The baseline graph `name` (model_fp32.onnx, or model_fp16.onnx for TensorRT) into dest_dir."""
    path = export_fp32(fp32, example, dest_dir / "model_fp32.onnx", opset, device)
    if name == "model_fp16.onnx":
        trt_graphs.fp16_graph(path, dest_dir / name)
    return dest_dir / name


def qdq_export(model: torch.nn.Module, example: dict, dest: Path, opset: int, device: torch.device) -> Path:
    """The one Q/DQ export of the fake-quant model every quantized graph is converted from."""
    try:
        return export(model.cpu(), example, dest, opset)
    finally:
        model.to(device)


def quantized_graph(
    model: torch.nn.Module, example: dict, name: str, dest: Path, opset: int, fold_weights: bool, device: torch.device
) -> dict:
    """One quantized graph (`name`: model_int8.onnx | model_int8_trt.onnx | model_fp8.onnx) of the model
    as it is now, into `dest` (the tune stage re-times the engine after each fallback step with it)."""
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".export_") as tmp:
        qdq = qdq_export(model, example, Path(tmp) / "model_qdq.onnx", opset, device)
        return convert_quantized(qdq, name, dest, fold_weights)


def convert_quantized(qdq: Path, name: str, dest: Path, fold_weights: bool) -> dict:
    """The Q/DQ export of the fake-quant model -> the graph `name` an engine builds from."""
    if name == "model_int8.onnx":
        return _cpu_int8(qdq, dest, fold_weights)
    return trt_graphs.quantized_graph(qdq, dest, "fp8" if name == "model_fp8.onnx" else "int8")


def _cpu_int8(qdq: Path, int8: Path, fold_weights: bool) -> dict:
    """model_int8.onnx: folded int8 weights (export.fold_weights), dedicated pairs."""
    shutil.copyfile(qdq, int8)
    folded, dedicated = rewrite(int8, fold_weight_quantization if fold_weights else (lambda m: 0), dedicate_qdq)
    return {**count_qdq(int8), "folded_weights": folded, "dedicated_qdq_pairs": dedicated}
