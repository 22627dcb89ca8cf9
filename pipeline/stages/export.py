"""export: the ONNX graphs the engines build from, with dynamic batch and sequence axes.

- model_fp32.onnx: the FP32 baseline (ONNX Runtime).
- model_int8.onnx: INT8 Q/DQ for ONNX Runtime (quant.format=int8): int8 weights + DQ, dedicated Q/DQ
  pairs, P (softmax output) unsigned (0..255), FP32 elsewhere: ORT CPU's fastest INT8 form.
- With export.tensorrt_graphs (default) or engine=tensorrt, TensorRT's strongly typed graphs
  (pipeline/engines/trt_graphs.py): model_fp16.onnx, model_int8_trt.onnx (signed INT8, FP16 compute).
- quant.format=fp8: model_fp8.onnx (FP8 E4M3 Q/DQ, FP16 compute) instead of the INT8 graphs.

Every quantized graph comes from one Q/DQ export of the fake-quant model (FP32 weights + Q), written
to a temporary file and converted per target, so each format quantizes the FP32 weights once.
Cached by everything upstream + the export config + whether TensorRT graphs are written.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

from pipeline.cache import cached, link_or_copy
from pipeline.context import RunContext
from pipeline.data import batches
from pipeline.engines import trt_graphs
from pipeline.onnx_export import count_qdq, dedicate_qdq, export, fold_weight_quantization, rewrite
from pipeline.schema import RunConfig

log = logging.getLogger(__name__)
FILES = ("model_fp32.onnx", "model_int8.onnx", "model_fp16.onnx", "model_int8_trt.onnx", "model_fp8.onnx")
_INFO = ("onnx_int8", "onnx_tensorrt")  # what export records in metrics.quantization (cached with the files)


def tensorrt_graphs_wanted(cfg: RunConfig) -> bool:
    return cfg.export.tensorrt_graphs or cfg.engine.name == "tensorrt"


def run(cfg: RunConfig, ctx: RunContext) -> str | None:
    key = ctx.chain_key("export", cfg.export, tensorrt_graphs_wanted(cfg))

    def save(tmp: Path) -> None:
        for f in FILES:
            if ctx.path(f).exists():
                link_or_copy(ctx.path(f), tmp / f)
        (tmp / "onnx_info.json").write_text(json.dumps({k: ctx.metrics.quantization.get(k) for k in _INFO}))

    def restore(hit: Path) -> None:
        for f in FILES:
            if (hit / f).exists():
                link_or_copy(hit / f, ctx.path(f))
        for k, v in json.loads((hit / "onnx_info.json").read_text()).items():
            if v is not None:
                ctx.metrics.quantization[k] = v

    hit = cached(ctx.cache, "export", key, compute=lambda: _export(cfg, ctx), save=save, restore=restore)
    ctx.artifacts.onnx = {f: ctx.path(f) for f in FILES if ctx.path(f).exists()}
    ctx.artifacts.onnx_fp32 = ctx.artifacts.onnx.get("model_fp32.onnx")
    ctx.artifacts.onnx_int8 = ctx.artifacts.onnx.get("model_int8.onnx")
    return "cached" if hit else None


def _export(cfg: RunConfig, ctx: RunContext) -> None:
    # Example: two eval sentences of different lengths, so the traced graph carries a real padding mask.
    example = next(batches(ctx.tokenizer, ctx.encoded["eval"], 2)).inputs
    export_fp32(cfg, ctx, example, ctx.path("model_fp32.onnx"))
    trt: dict[str, dict] = {}
    if tensorrt_graphs_wanted(cfg):
        trt["model_fp16.onnx"] = trt_graphs.fp16_graph(ctx.path("model_fp32.onnx"), ctx.path("model_fp16.onnx"))
    if ctx.quantized:
        with tempfile.TemporaryDirectory(dir=ctx.run_dir, prefix=".export_") as tmp:
            qdq = export(ctx.model.cpu(), example, Path(tmp) / "model_qdq.onnx", cfg.export.opset)
            ctx.model.to(ctx.device)
            if cfg.quant.format == "fp8":
                trt["model_fp8.onnx"] = convert_quantized(cfg, qdq, "model_fp8.onnx", ctx.path("model_fp8.onnx"))
            else:
                if tensorrt_graphs_wanted(cfg):
                    trt["model_int8_trt.onnx"] = convert_quantized(cfg, qdq, "model_int8_trt.onnx", ctx.path("model_int8_trt.onnx"))
                ctx.metrics.quantization["onnx_int8"] = convert_quantized(cfg, qdq, "model_int8.onnx", ctx.path("model_int8.onnx"))
                log.info("export: model_int8.onnx %s", ctx.metrics.quantization["onnx_int8"])
    if trt:
        ctx.metrics.quantization["onnx_tensorrt"] = trt


def export_fp32(cfg: RunConfig, ctx: RunContext, example: dict, dest: Path) -> Path:
    """The FP32 baseline graph of the run's FP32 model."""
    fp32 = ctx.fp32_model if ctx.fp32_model is not None else ctx.model
    attn = fp32.config._attn_implementation
    # Eager attention for the FP32 graph: SDPA exports with IsNaN/Where guards that cost ~10 % of the
    # FP32 engine's time on ORT CPU; the baseline should be the fastest honest FP32 graph.
    fp32.set_attn_implementation("eager")
    export(fp32.cpu(), example, dest, cfg.export.opset)
    fp32.set_attn_implementation(attn)
    fp32.to(ctx.device)
    return dest


def baseline_graph(cfg: RunConfig, ctx: RunContext, example: dict, name: str, dest_dir: Path) -> Path:
    """The baseline graph `name` (model_fp32.onnx, or model_fp16.onnx for TensorRT) into dest_dir."""
    fp32 = export_fp32(cfg, ctx, example, dest_dir / "model_fp32.onnx")
    if name == "model_fp16.onnx":
        trt_graphs.fp16_graph(fp32, dest_dir / name)
    return dest_dir / name


def quantized_graph(cfg: RunConfig, ctx: RunContext, example: dict, name: str, dest: Path) -> dict:
    """One quantized graph (`name`: model_int8.onnx | model_int8_trt.onnx | model_fp8.onnx) of the model
    as it is now, into `dest`: the same export and conversion as this stage (the tune stage re-times
    the engine after each fallback step with it)."""
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".export_") as tmp:
        qdq = export(ctx.model.cpu(), example, Path(tmp) / "model_qdq.onnx", cfg.export.opset)
        ctx.model.to(ctx.device)
        return convert_quantized(cfg, qdq, name, dest)


def convert_quantized(cfg: RunConfig, qdq: Path, name: str, dest: Path) -> dict:
    """The Q/DQ export of the fake-quant model -> the graph `name` an engine builds from."""
    if name == "model_int8.onnx":
        return _ort_int8(cfg, qdq, dest)
    return trt_graphs.quantized_graph(qdq, dest, "fp8" if name == "model_fp8.onnx" else "int8")


def _ort_int8(cfg: RunConfig, qdq: Path, int8: Path) -> dict:
    """model_int8.onnx for ONNX Runtime: folded int8 weights (export.fold_weights), dedicated pairs."""
    shutil.copyfile(qdq, int8)
    folded, dedicated = rewrite(int8, fold_weight_quantization if cfg.export.fold_weights else (lambda m: 0), dedicate_qdq)
    return {**count_qdq(int8), "folded_weights": folded, "dedicated_qdq_pairs": dedicated}
