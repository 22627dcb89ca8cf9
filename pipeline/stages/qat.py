"""qat: fine-tune with quantizers active (straight-through estimator), optionally distilling from the
frozen FP32 model. Starts from the calibrate stage's amax, so any calibration method combines with it."""

from __future__ import annotations

from pipeline.context import RunContext
from pipeline.schema import RunConfig
from pipeline.stages import _common
from pipeline.stages.calibrate import save_quantizer_state


def run(cfg: RunConfig, ctx: RunContext) -> None:
    for q in ctx.quantizers.values():
        # Weight amax follows the calibrated per-channel max; learnable amax trains every range.
        q.set_learnable(cfg.qat.learn_amax and q.amax is not None)
    teacher = ctx.fp32_model if cfg.qat.distill else None
    _common.train_stage("qat", cfg.qat, cfg, ctx, teacher=teacher)
    for q in ctx.quantizers.values():
        q.set_learnable(False)
    save_quantizer_state(ctx)  # amax may have moved (learn_amax); weights certainly did
