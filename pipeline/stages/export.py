"""export: model_fp32.onnx and (when quantized) model_int8.onnx with Q/DQ; dynamic batch and sequence.
Cached by everything upstream + the export config."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pipeline.cache import cached, link_or_copy
from pipeline.context import RunContext
from pipeline.data import batches
from pipeline.onnx_export import count_qdq, dedicate_qdq, export, fold_weight_quantization
from pipeline.schema import RunConfig

log = logging.getLogger(__name__)
FILES = ("model_fp32.onnx", "model_int8.onnx")


def run(cfg: RunConfig, ctx: RunContext) -> str | None:
    key = ctx.chain_key("export", cfg.export)

    def save(tmp: Path) -> None:
        for f in FILES:
            if ctx.path(f).exists():
                link_or_copy(ctx.path(f), tmp / f)
        (tmp / "onnx_int8.json").write_text(json.dumps(ctx.metrics.quantization.get("onnx_int8")))

    def restore(hit: Path) -> None:
        for f in FILES:
            if (hit / f).exists():
                link_or_copy(hit / f, ctx.path(f))
        info = json.loads((hit / "onnx_int8.json").read_text())
        if info is not None:
            ctx.metrics.quantization["onnx_int8"] = info

    hit = cached(ctx.cache, "export", key, compute=lambda: _export(cfg, ctx), save=save, restore=restore)
    ctx.artifacts.onnx_fp32 = ctx.path("model_fp32.onnx")
    ctx.artifacts.onnx_int8 = ctx.path("model_int8.onnx") if ctx.path("model_int8.onnx").exists() else None
    return "cached" if hit else None


def _export(cfg: RunConfig, ctx: RunContext) -> None:
    # Example: two eval sentences of different lengths, so the traced graph carries a real padding mask.
    example = next(batches(ctx.tokenizer, ctx.encoded["eval"], 2)).inputs
    fp32 = ctx.fp32_model if ctx.fp32_model is not None else ctx.model
    attn = fp32.config._attn_implementation
    # Eager attention for the FP32 graph: SDPA exports with IsNaN/Where guards that cost ~10 % of the
    # FP32 engine's time on ORT CPU; the baseline should be the fastest honest FP32 graph.
    fp32.set_attn_implementation("eager")
    export(fp32.cpu(), example, ctx.path("model_fp32.onnx"), cfg.export.opset)
    fp32.set_attn_implementation(attn)
    fp32.to(ctx.device)
    if not ctx.quantized:
        return
    int8 = export(ctx.model.cpu(), example, ctx.path("model_int8.onnx"), cfg.export.opset)
    ctx.model.to(ctx.device)
    folded = fold_weight_quantization(int8) if cfg.export.fold_weights else 0
    dedicated = dedicate_qdq(int8)
    ctx.metrics.quantization["onnx_int8"] = {**count_qdq(int8), "folded_weights": folded, "dedicated_qdq_pairs": dedicated}
    log.info("export: model_int8.onnx %s", ctx.metrics.quantization["onnx_int8"])
