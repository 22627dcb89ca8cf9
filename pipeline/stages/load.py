"""load: task data splits, then model + tokenizer sized for the task's labels."""

from __future__ import annotations

import logging

from pipeline.context import RunContext
from pipeline.schema import RunConfig

log = logging.getLogger(__name__)


def run(cfg: RunConfig, ctx: RunContext) -> None:
    if ctx.splits is None:  # the pre-flight reads local data; hub data (and callers without a pre-flight) here
        ctx.splits = ctx.task.load_splits(cfg.data)
    loaded = ctx.task.load_model(cfg.model, ctx.splits.num_labels, ctx.device)
    ctx.model, ctx.tokenizer, ctx.head_trained, ctx.model_load = loaded.model, loaded.tokenizer, loaded.head_trained, loaded.report
    ctx.chain_key("load", cfg.model, cfg.data, ctx.seed, *ctx.task.cache_parts())
    names = ("train", "calib", "eval") + (("tune",) if ctx.splits.tune is not None else ())
    ctx.encoded = {name: ctx.task.encode(ctx.tokenizer, getattr(ctx.splits, name), cfg.model.max_length) for name in names}
    log.info(
        "load: %s (%s, %.1fM params) | %s: train %d, calib %d, eval %d, tune %d, labels %s",
        cfg.model.name,
        type(ctx.model).__name__,
        sum(p.numel() for p in ctx.model.parameters()) / 1e6,
        cfg.data.name,
        len(ctx.splits.train),
        len(ctx.splits.calib),
        len(ctx.splits.eval),
        len(ctx.splits.tune or []),
        ctx.splits.label_names,
    )
    if not ctx.head_trained and not cfg.finetune.enabled:
        log.warning("load: the task head is freshly initialized and finetune=none: accuracies will be near chance")
