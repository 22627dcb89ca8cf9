"""export: model_fp32.onnx and (when quantized) model_int8.onnx with Q/DQ; dynamic batch and sequence."""

from __future__ import annotations

import logging

from pipeline.context import RunContext
from pipeline.data import batches
from pipeline.onnx_export import count_qdq, dedicate_qdq, export, fold_weight_quantization
from pipeline.schema import RunConfig

log = logging.getLogger(__name__)


def run(cfg: RunConfig, ctx: RunContext) -> None:
    # Example: two eval sentences of different lengths, so the traced graph carries a real padding mask.
    example = next(batches(ctx.tokenizer, ctx.encoded["eval"], 2)).inputs
    fp32 = ctx.fp32_model if ctx.fp32_model is not None else ctx.model
    attn = fp32.config._attn_implementation
    # Eager attention for the FP32 graph: SDPA exports with IsNaN/Where guards that cost ~10 % of the
    # FP32 engine's time on ORT CPU; the baseline should be the fastest honest FP32 graph.
    fp32.set_attn_implementation("eager")
    ctx.artifacts.onnx_fp32 = export(fp32.cpu(), example, ctx.path("model_fp32.onnx"), cfg.export.opset)
    fp32.set_attn_implementation(attn)
    fp32.to(ctx.device)
    if not ctx.quantized:
        return
    ctx.artifacts.onnx_int8 = export(ctx.model.cpu(), example, ctx.path("model_int8.onnx"), cfg.export.opset)
    ctx.model.to(ctx.device)
    folded = fold_weight_quantization(ctx.artifacts.onnx_int8) if cfg.export.fold_weights else 0
    dedicated = dedicate_qdq(ctx.artifacts.onnx_int8)
    counts = count_qdq(ctx.artifacts.onnx_int8)
    ctx.metrics.quantization["onnx_int8"] = {**counts, "folded_weights": folded, "dedicated_qdq_pairs": dedicated}
    log.info("export: model_int8.onnx %s", ctx.metrics.quantization["onnx_int8"])
