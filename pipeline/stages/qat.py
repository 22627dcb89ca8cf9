"""qat: fine-tune with quantizers active (straight-through estimator), optionally distilling from the
frozen FP32 model. Starts from the calibrate stage's amax, so any calibration method combines with it.
Cached by everything upstream + the qat config."""

from __future__ import annotations

from pipeline.cache import cached
from pipeline.context import RunContext
from pipeline.quantization.state import save_quantizer_state
from pipeline.schema import RunConfig
from pipeline.stages import _common


def run(cfg: RunConfig, ctx: RunContext) -> str | None:
    key = ctx.chain_key("qat", cfg.qat)

    def compute() -> None:
        for q in ctx.quantizers.values():
            # Weight amax follows the calibrated per-channel max; learnable amax trains every range.
            q.set_learnable(cfg.qat.learn_amax and q.amax is not None)
        ctx.model.to(ctx.device)
        # The task may learn from the FP32 model alone (embedding: distillation, no labels).
        teacher = ctx.fp32_model if cfg.qat.distill or getattr(ctx.task, "distills", False) else None
        try:
            _common.train_stage("qat", cfg.qat, cfg, ctx, teacher=teacher)
        finally:
            for q in ctx.quantizers.values():
                q.set_learnable(False)  # plain buffers again for export and the cache

    hit = cached(
        ctx.cache,
        "qat",
        key,
        compute=compute,
        save=lambda tmp: _common.save_trained(ctx, "qat", tmp),
        restore=lambda h: _common.restore_trained(ctx, "qat", h, key),
    )
    ctx.artifacts.quantizers = save_quantizer_state(ctx.quantizers, ctx.run_dir)  # amax may have moved (learn_amax); weights certainly did
    return "cached" if hit else None
