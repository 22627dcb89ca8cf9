"""qat: fine-tune with quantizers active (straight-through estimator), optionally distilling from the
frozen FP32 model. Starts from the calibrate stage's amax, so any calibration method combines with it.
Cached by everything upstream + the qat config."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from pipeline.cache import cached, link_or_copy
from pipeline.context import RunContext
from pipeline.schema import RunConfig
from pipeline.stages import _common
from pipeline.stages.calibrate import save_quantizer_state
from pipeline.training import state_for_safetensors


def run(cfg: RunConfig, ctx: RunContext) -> str | None:
    key = ctx.chain_key("qat", cfg.qat)

    def compute() -> None:
        for q in ctx.quantizers.values():
            # Weight amax follows the calibrated per-channel max; learnable amax trains every range.
            q.set_learnable(cfg.qat.learn_amax and q.amax is not None)
        ctx.model.to(ctx.device)
        teacher = ctx.fp32_model if cfg.qat.distill else None
        try:
            _common.train_stage("qat", cfg.qat, cfg, ctx, teacher=teacher)
        finally:
            for q in ctx.quantizers.values():
                q.set_learnable(False)  # plain buffers again for export and the cache

    def save(tmp: Path) -> None:
        save_file(state_for_safetensors(ctx.model), str(tmp / "state.safetensors"))
        (tmp / "training.json").write_text(json.dumps(ctx.metrics.training["qat"]))
        if ctx.path("loss_qat.png").exists():
            link_or_copy(ctx.path("loss_qat.png"), tmp / "loss_qat.png")

    def restore(hit: Path) -> None:
        ctx.model.load_state_dict(load_file(str(hit / "state.safetensors")))
        ctx.model.eval()
        ctx.metrics.training["qat"] = {**json.loads((hit / "training.json").read_text()), "cached_from": key}
        if (hit / "loss_qat.png").exists():
            link_or_copy(hit / "loss_qat.png", ctx.path("loss_qat.png"))

    hit = cached(ctx.cache, "qat", key, compute=compute, save=save, restore=restore)
    save_quantizer_state(ctx)  # amax may have moved (learn_amax); weights certainly did
    return "cached" if hit else None
