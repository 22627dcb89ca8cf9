"""finetune: train the FP32 baseline (task head + encoder) with the shared training loop.

Cached (pipeline/cache.py) by model + data + finetune config + seed: sweep jobs that differ only in
calibration, QAT or export share one fine-tuned model.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from pipeline.context import RunContext
from pipeline.schema import RunConfig
from pipeline.stages import _common

log = logging.getLogger(__name__)


def run(cfg: RunConfig, ctx: RunContext) -> str | None:
    if ctx.head_trained:
        log.info("finetune: the checkpoint already has a task head; training it further (finetune=none skips this)")
    key = ctx.chain_key("finetune", cfg.finetune)

    def compute() -> None:
        _common.train_stage("finetune", cfg.finetune, cfg, ctx, teacher=None)
        _save_pretrained(ctx, ctx.path("finetuned"))

    hit = _common.cached_training(ctx, "finetune", key, compute, files=("finetuned",))
    ctx.artifacts.finetuned = ctx.path("finetuned")
    return "cached" if hit else None


def _save_pretrained(ctx: RunContext, dest: Path) -> Path:
    """save_pretrained into a temp folder, then rename: no half-written finetuned/ after a crash."""
    tmp = Path(tempfile.mkdtemp(prefix=".finetuned.", dir=dest.parent))
    try:
        ctx.model.save_pretrained(tmp)
        ctx.tokenizer.save_pretrained(tmp)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
