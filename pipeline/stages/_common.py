"""What the two training stages (finetune, qat) share: run the training loop with the task's own
best-state selection on the tuning split, record its curve, and cache / restore the trained state."""

from __future__ import annotations

import logging

import numpy as np
import torch

from pipeline.context import Produces, RunContext
from pipeline.data.batching import batches
from pipeline.outputs import atomic_write
from pipeline.quantization.state import save_quantizer_state
from pipeline.schema import RunConfig, TrainConfig
from pipeline.tasks import Models
from pipeline.training import latest_checkpoint, train

log = logging.getLogger(__name__)


def calib_batches(cfg: RunConfig, ctx: RunContext) -> list[dict[str, torch.Tensor]]:
    """The calibration split's model inputs as the calibrate stage feeds them (calibration.batch_size / num_batches)."""
    c = cfg.calibration
    return [b.to(ctx.device).inputs for b in batches(ctx.tokenizer, ctx.encoded["calib"], c.batch_size, limit=c.num_batches)]


def train_stage(name: str, tcfg: TrainConfig, cfg: RunConfig, ctx: RunContext, teacher: torch.nn.Module | None) -> None:
    """Run the shared loop for a training stage and record its curve, metrics and checkpoint."""
    eval_fn = None
    # Evaluations during training (per epoch, every N steps, best-state selection) read the tuning split
    # only: a state chosen on the eval split would make the reported eval accuracy optimistic.
    tune = ctx.encoded.get("tune")
    evaluates = tcfg.eval_each_epoch or tcfg.eval_every != 0 or tcfg.keep_best  # eval_every null = every quarter
    if evaluates and tune is None:
        log.warning("%s: no tuning split (data.num_tune=0): no evaluation during training, no best-state selection", name)
    elif evaluates:
        reference: dict = {}  # FP32 outputs on the tuning split, computed once (fidelity measures)
        models = Models(ctx.model, ctx.fp32_model, ctx.tokenizer, ctx.device)

        def eval_fn() -> dict:
            return ctx.task.selection(models, tune, cfg.evaluate.batch_size, reference)

    # The newest complete checkpoint of this stage in the run being resumed (None: start afresh).
    resume = latest_checkpoint(ctx.resume_from / "checkpoints" / name) if ctx.resume_from is not None else None
    result = train(
        ctx.model,
        ctx.tokenizer,
        ctx.encoded["train"],
        tcfg,
        device=ctx.device,
        seed=tcfg.seed if tcfg.seed is not None else ctx.seed,
        checkpoint_dir=ctx.path("checkpoints") / name,
        desc=name,
        teacher=teacher,
        eval_fn=eval_fn,
        resume=resume,
        objective=ctx.task.objective if ctx.task is not None else None,
    )
    ctx.metrics.training[name] = {
        "steps": result.steps,
        "final_loss": float(np.mean(result.losses[-20:])) if result.losses else None,
        "seconds": round(result.seconds, 2),
        "resumed_from_step": result.resumed_from_step,
        "epoch_eval": result.epoch_eval,
        # On the tuning split: start / best / end of training, and whether the best state was restored.
        "selection": result.selection,
        "evals": result.evals,
    }
    if result.losses:
        ctx.artifacts.plots[f"loss_{name}"] = plot_loss(result.losses, ctx.path(f"loss_{name}.png"), name)


def run_qat(cfg: RunConfig, ctx: RunContext) -> bool:
    """QAT from the model as it is (the calibrated or tuned quantizers), cached by everything upstream +
    the qat config; the quantizer state file is written again (weights moved; amax too with learn_amax).
    Returns whether the cache had it. Called by the qat stage, and by tune=auto as its second step."""
    key = ctx.chain_key("qat", cfg.qat)

    def compute() -> None:
        for q in ctx.quantizers.values():
            # Weight amax follows the calibrated per-channel max; learnable amax trains every range.
            q.set_learnable(cfg.qat.learn_amax and q.amax is not None)
        ctx.model.to(ctx.device)
        # The task may learn from the FP32 model alone (embedding: distillation, no labels).
        teacher = ctx.fp32_model if cfg.qat.distill or getattr(ctx.task, "distills", False) else None
        try:
            train_stage("qat", cfg.qat, cfg, ctx, teacher=teacher)
        finally:
            for q in ctx.quantizers.values():
                q.set_learnable(False)  # plain buffers again for export and the cache

    hit = cached_training(ctx, "qat", key, compute)
    ctx.artifacts.quantizers = save_quantizer_state(ctx.quantizers, ctx.run_dir)
    return hit


def cached_training(ctx: RunContext, stage: str, key: str, compute, files: tuple[str, ...] = ()) -> bool:
    """A training stage through the stage cache: it produces the trained state (weights + amax), its
    metrics and loss curve (+ `files`); a reused entry says which key it came from."""
    produces = Produces(files=(*files, f"loss_{stage}.png"), metrics=(f"training.{stage}",), model_state=True)
    hit = ctx.cached(stage, key, produces, compute)
    if hit:
        ctx.metrics.training[stage]["cached_from"] = key
    return hit


def plot_loss(losses: list[float], path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, lw=0.8, alpha=0.4, label="step loss")
    if len(losses) >= 10:
        k = max(5, len(losses) // 20)
        ax.plot(steps[k - 1 :], np.convolve(losses, np.ones(k) / k, mode="valid"), lw=1.8, label=f"mean of {k}")
    ax.set(xlabel="optimizer step", ylabel="loss", title=f"{title} loss")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)
    return path
