"""build_engine: one engine per precision from the ONNX files; records which kernels run in INT8."""

from __future__ import annotations

import logging

from pipeline.context import RunContext
from pipeline.engines import ENGINES
from pipeline.schema import RunConfig

log = logging.getLogger(__name__)


def run(cfg: RunConfig, ctx: RunContext) -> None:
    kind = ENGINES[cfg.engine.name]()
    sources = {"fp32": ctx.artifacts.onnx_fp32, "int8": ctx.artifacts.onnx_int8}
    for precision, onnx_path in sources.items():
        if onnx_path is None:
            continue
        engine = kind.build(onnx_path, precision, cfg.engine, ctx.run_dir)
        ctx.engines[precision] = engine
        ctx.artifacts.engine_files.update({f"{precision}_{k}": v for k, v in engine.files.items()})
        ctx.metrics.quantization.setdefault("engine_kernels", {})[precision] = engine.kernels
        log.info("build_engine: %s %s kernels %s", cfg.engine.name, precision, engine.kernels)
