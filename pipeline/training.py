"""The one training loop: FP32 fine-tuning (finetune stage) and quantization-aware training (qat stage).

Deterministic and resumable: epoch e shuffles with seed + e; a checkpoint holds weights and quantizer
state (safetensors), optimizer, scheduler, RNG states and the step, so a resumed run continues the
same batch sequence with the same dropout masks and ends where an uninterrupted run ends.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import get_scheduler

from pipeline.data import batches
from pipeline.data.batching import Encoded
from pipeline.outputs import atomic_write, write_json
from pipeline.schema import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)  # per optimizer step
    epoch_eval: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from_step: int = 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # Biases, norms and quantizer ranges are not regularized toward zero.
        (no_decay if p.ndim < 2 or "amax" in name or "norm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, alpha: float, temperature: float) -> torch.Tensor:
    """alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(softmax(teacher/T) || softmax(student/T))."""
    t = temperature
    soft = F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True, reduction="batchmean")
    return alpha * F.cross_entropy(student, labels) + (1 - alpha) * t * t * soft


def train(
    model: torch.nn.Module,
    tokenizer,
    data: Encoded,
    cfg: TrainConfig,
    *,
    device: torch.device,
    seed: int,
    checkpoint_dir: Path,
    desc: str,
    teacher: torch.nn.Module | None = None,
    eval_fn: Callable[[], dict] | None = None,
    resume: Path | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Train `model` in place.

    Args:
        checkpoint_dir: where checkpoints go (`<run>/checkpoints/<stage>`).
        teacher: frozen FP32 model for distillation (cfg.distill).
        eval_fn: called after each epoch when cfg.eval_each_epoch (returns a metrics dict).
        resume: a checkpoint folder to continue from.
        stop_after: stop (with a checkpoint) after this many steps — simulates an interruption in tests.
    """
    steps_per_epoch = math.ceil(len(data) / cfg.batch_size)
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    epochs = math.ceil(total / steps_per_epoch)
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr)
    sched = get_scheduler(cfg.schedule, opt, num_warmup_steps=int(cfg.warmup_ratio * total), num_training_steps=total)
    result = TrainResult(steps=0)
    seed_everything(seed)
    if resume is not None:
        result = _load_checkpoint(resume, model, opt, sched)
        log.info("%s: resumed from %s at step %d", desc, resume, result.steps)
    if teacher is not None:
        teacher.eval()
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(total=total, initial=result.steps, desc=desc, unit="step", dynamic_ncols=True, mininterval=1.0)
    step = result.steps
    for epoch in range(step // steps_per_epoch, epochs):
        skip = step - epoch * steps_per_epoch  # batches of this epoch already done before a resume
        for i, batch in enumerate(batches(tokenizer, data, cfg.batch_size, shuffle=True, seed=seed + epoch)):
            if i < skip:
                continue
            if step >= total:
                break
            batch = batch.to(device)
            logits = model(**batch.inputs).logits
            if cfg.distill and teacher is not None:
                with torch.no_grad():
                    t_logits = teacher(**batch.inputs).logits
                loss = kd_loss(logits, t_logits, batch.labels, cfg.kd_alpha, cfg.kd_temperature)
            else:
                loss = F.cross_entropy(logits, batch.labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            step += 1
            result.losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(
                loss=f"{result.losses[-1]:.4f}",
                ex_s=f"{cfg.batch_size * (step - result.resumed_from_step) / (time.perf_counter() - t0):.0f}",
            )
            if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or (stop_after is not None and step >= stop_after):
                result.steps = step
                _save_checkpoint(checkpoint_dir, model, opt, sched, result)
            if stop_after is not None and step >= stop_after:
                bar.close()
                result.seconds += time.perf_counter() - t0
                return result
        if cfg.eval_each_epoch and eval_fn is not None:
            model.eval()
            result.epoch_eval.append({"epoch": epoch + 1, "step": step, **eval_fn()})
            log.info("%s epoch %d: %s", desc, epoch + 1, result.epoch_eval[-1])
            model.train()
    bar.close()
    model.eval()
    result.steps = step
    result.seconds += time.perf_counter() - t0
    _save_checkpoint(checkpoint_dir, model, opt, sched, result)
    return result


def state_for_safetensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict (weights + quantizer amax) in a form safetensors accepts."""
    return _dedupe({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()})


def _save_checkpoint(folder: Path, model, opt, sched, result: TrainResult) -> None:
    """weights+quantizers (safetensors), optimizer/scheduler/RNG (torch), progress (json); each atomic."""
    folder.mkdir(parents=True, exist_ok=True)
    state = state_for_safetensors(model)
    atomic_write(folder / "model.safetensors", lambda p: save_file(state, str(p)))
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    atomic_write(
        folder / "trainer_state.pt", lambda p: torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rng}, p)
    )
    write_json(
        folder / "progress.json",
        {"step": result.steps, "losses": result.losses, "epoch_eval": result.epoch_eval, "seconds": result.seconds},
    )


def _dedupe(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Tied weights (e.g. shared embeddings) share storage, which safetensors refuses: clone them.
    seen, out = set(), {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr() if v.numel() else None
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def _load_checkpoint(folder: Path, model, opt, sched) -> TrainResult:
    missing = [f for f in ("model.safetensors", "trainer_state.pt", "progress.json") if not (folder / f).exists()]
    if missing:
        raise FileNotFoundError(f"resume: checkpoint {folder} is incomplete (missing {', '.join(missing)})")
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    trainer = torch.load(folder / "trainer_state.pt", weights_only=False)
    opt.load_state_dict(trainer["optimizer"])
    sched.load_state_dict(trainer["scheduler"])
    torch.set_rng_state(trainer["rng"]["torch"])
    np.random.set_state(trainer["rng"]["numpy"])
    random.setstate(trainer["rng"]["python"])
    progress = json.loads((folder / "progress.json").read_text())
    return TrainResult(
        steps=progress["step"],
        losses=progress["losses"],
        epoch_eval=progress["epoch_eval"],
        seconds=progress["seconds"],
        resumed_from_step=progress["step"],
    )
