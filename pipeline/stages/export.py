"""export: the ONNX graphs the engines build from, with dynamic batch and sequence axes.

- model_fp32.onnx: the FP32 baseline (ONNX Runtime).
- model_int8.onnx: INT8 Q/DQ for the CPU engines (quant.format=int8): int8 weights + DQ, dedicated Q/DQ
  pairs, uint8 Linear inputs with zero points (quant.activations=asymmetric), P (softmax output) unsigned
  (0..255), FP32 elsewhere: the u8 x s8 form ONNX Runtime and OpenVINO run natively.
- With export.tensorrt_graphs (default) or engine=tensorrt, TensorRT's strongly typed graphs
  (pipeline/engines/trt_graphs.py): model_fp16.onnx, model_int8_trt.onnx (signed INT8, FP16 compute).
- quant.format=fp8: model_fp8.onnx (FP8 E4M3 Q/DQ, FP16 compute) instead of the INT8 graphs.

Every quantized graph comes from one Q/DQ export of the fake-quant model (FP32 weights + Q), written
to a temporary file and converted per target, so each format quantizes the FP32 weights once.
Cached by everything upstream + the export config + whether TensorRT graphs are written.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from pipeline import graphs
from pipeline.context import Produces, RunContext
from pipeline.data import batches
from pipeline.engines import graphs_for, trt_graphs
from pipeline.graphs import FILES
from pipeline.schema import RunConfig

log = logging.getLogger(__name__)
# The graph files, and what export records about them in metrics.quantization.
PRODUCES = Produces(files=FILES, metrics=("quantization.onnx_int8", "quantization.onnx_tensorrt"))


def tensorrt_graphs_wanted(cfg: RunConfig) -> bool:
    return cfg.export.tensorrt_graphs or "model_int8_trt.onnx" in graphs_for(cfg.engine, "int8").values()


def run(cfg: RunConfig, ctx: RunContext) -> str | None:
    key = ctx.chain_key("export", cfg.export, tensorrt_graphs_wanted(cfg))

    hit = ctx.cached("export", key, PRODUCES, lambda: _export(cfg, ctx))
    ctx.artifacts.onnx = {f: ctx.path(f) for f in FILES if ctx.path(f).exists()}
    return "cached" if hit else None


def _export(cfg: RunConfig, ctx: RunContext) -> None:
    # Example: two calibration sentences of different lengths, so the traced graph carries a real padding
    # mask (the eval split is read by evaluate alone).
    example = next(batches(ctx.tokenizer, ctx.encoded["calib"], 2)).inputs
    opset, fold = cfg.export.opset, cfg.export.fold_weights
    fp32 = ctx.fp32_model if ctx.fp32_model is not None else ctx.model
    graphs.export_fp32(fp32, example, ctx.path("model_fp32.onnx"), opset, ctx.device)
    trt: dict[str, dict] = {}
    if tensorrt_graphs_wanted(cfg):
        trt["model_fp16.onnx"] = trt_graphs.fp16_graph(ctx.path("model_fp32.onnx"), ctx.path("model_fp16.onnx"))
    if ctx.quantized:
        with tempfile.TemporaryDirectory(dir=ctx.run_dir, prefix=".export_") as tmp:
            qdq = graphs.qdq_export(ctx.model, example, Path(tmp) / "model_qdq.onnx", opset, ctx.device)
            if cfg.quant.format == "fp8":
                trt["model_fp8.onnx"] = graphs.convert_quantized(qdq, "model_fp8.onnx", ctx.path("model_fp8.onnx"), fold)
            else:
                if tensorrt_graphs_wanted(cfg):
                    trt["model_int8_trt.onnx"] = graphs.convert_quantized(qdq, "model_int8_trt.onnx", ctx.path("model_int8_trt.onnx"), fold)
                ctx.metrics.quantization.onnx_int8 = graphs.convert_quantized(qdq, "model_int8.onnx", ctx.path("model_int8.onnx"), fold)
                log.info("export: model_int8.onnx %s", ctx.metrics.quantization.onnx_int8)
    if trt:
        ctx.metrics.quantization.onnx_tensorrt = trt
