"""build_engine: one engine per precision from the graphs the engine asks for (engines.GRAPHS);
records which kernels run in INT8. On ONNX Runtime it also opens TensorRT's graphs (when exported)
so that evaluate can measure, on any machine, the numerics of exactly what TensorRT would build."""

from __future__ import annotations

import logging

from pipeline.context import RunContext
from pipeline.engines import ENGINES, GRAPHS, TRT_GRAPHS
from pipeline.schema import RunConfig

log = logging.getLogger(__name__)


def run(cfg: RunConfig, ctx: RunContext) -> None:
    kind = ENGINES[cfg.engine.name]()
    labels = list(GRAPHS[cfg.engine.name][cfg.quant.format].items())
    ctx.metrics.engine_precisions = {"baseline": labels[0][0], "quantized": labels[1][0] if ctx.quantized else None}
    for precision, name in labels:
        onnx_path = ctx.artifacts.onnx.get(name)
        if onnx_path is None:
            continue
        engine = kind.build(onnx_path, precision, cfg.engine, ctx.run_dir)
        ctx.engines[precision] = engine
        ctx.artifacts.engine_files.update({f"{precision}_{k}": v for k, v in engine.files.items()})
        ctx.metrics.quantization.setdefault("engine_kernels", {})[precision] = engine.kernels
        log.info("build_engine: %s %s kernels %s", cfg.engine.name, precision, engine.kernels)
    if cfg.engine.name != "onnxruntime":
        return
    for label, name in TRT_GRAPHS[cfg.quant.format].items():
        if name in ctx.artifacts.onnx:
            engine = kind.build(ctx.artifacts.onnx[name], label, cfg.engine, ctx.run_dir)
            ctx.check_engines[label] = engine
            fallback = getattr(engine, "fp32_fallback", None)
            ctx.metrics.tensorrt_graphs[label] = {"file": name, "ort_cpu_fp32_fallback_ops": fallback}
            log.info("build_engine: %s through ONNX Runtime; ops ORT CPU runs in FP32 for lack of FP16 kernels: %s", name, fallback)
