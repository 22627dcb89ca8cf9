"""finetune: train the FP32 baseline (task head + encoder) with the shared training loop."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from pipeline.context import RunContext
from pipeline.schema import RunConfig
from pipeline.stages import _common

log = logging.getLogger(__name__)


def run(cfg: RunConfig, ctx: RunContext) -> None:
    if ctx.head_trained:
        log.info("finetune: the checkpoint already has a task head; training it further (finetune=none skips this)")
    _common.train_stage("finetune", cfg.finetune, cfg, ctx, teacher=None)
    ctx.artifacts.finetuned = _save_pretrained(ctx, ctx.path("finetuned"))


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
