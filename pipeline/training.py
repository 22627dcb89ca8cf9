"""The one training loop: FP32 fine-tuning (finetune stage) and quantization-aware training (qat stage).

Deterministic and resumable: epoch e shuffles with seed + e; a checkpoint holds weights and quantizer
state, optimizer, scheduler, RNG states and the step (safetensors + JSON, never pickles), so a resumed
run continues the same batch sequence with the same dropout masks and ends where an uninterrupted run
ends. A checkpoint folder is renamed into place complete and verified before it is resumed from.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import get_scheduler

from pipeline import distributed
from pipeline.data import batches
from pipeline.data.batching import Encoded
from pipeline.schema import TrainConfig

log = logging.getLogger(__name__)

# A checkpoint is one folder checkpoints/<stage>/step-<N>/ holding these files.
_CKPT_PREFIX = "step-"
_CKPT_FILES = ("model.safetensors", "trainer_state.safetensors", "trainer_state.json")


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)  # per optimizer step
    epoch_eval: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from_step: int = 0
    # Best-state selection (cfg.keep_best / cfg.eval_every): every evaluation on the tuning split, and
    # {start, best, best_step, end, restored} (see _Selector).
    evals: list[dict] = field(default_factory=list)
    selection: dict | None = None


class _Selector:
    """Evaluates the model during training and keeps the best state (accuracy, ties: lower loss).

    With keep_best the model ends in the best state seen, the start included: training cannot end below
    where it started (on the selection split). The state copy lives on the CPU (one model's weights).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        eval_fn: Callable[[], dict],
        keep_best: bool,
        result: TrainResult,
        desc: str,
        select_by: str = "accuracy",
    ):
        self.model, self.eval_fn, self.keep_best, self.result, self.desc = model, eval_fn, keep_best, result, desc
        self.select_by = select_by
        self.best: dict | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.last_step: int | None = None
        self.stale = 0  # evaluations in a row since the best improved
        self.stopped_early = False

    def __call__(self, step: int) -> dict:
        if self.last_step == step:  # already evaluated at this step (e.g. epoch end == end)
            return self.result.evals[-1]
        was_training = self.model.training
        self.model.eval()
        r = {"step": step, **self.eval_fn()}
        self.model.train(was_training)
        self.result.evals.append(r)
        self.last_step = step
        log.info("%s step %d: %s", self.desc, step, {k: round(v, 5) if isinstance(v, float) else v for k, v in r.items()})
        if self.keep_best and (self.best is None or _score(r, self.select_by) > _score(self.best, self.select_by)):
            self.best = r
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
            self.stale = 0
        else:
            self.stale += 1
        return r

    def finish(self, step: int) -> None:
        end = self(step)
        restored = False
        if self.keep_best and self.best is not None and self.best["step"] != step:
            self.model.load_state_dict(self.best_state)
            restored = True
            log.info("%s: restored the best state (step %d: %s) over the end (%s)", self.desc, self.best["step"], self.best, end)
        self.result.selection = {
            "start": self.result.evals[0],
            "best": self.best if self.keep_best else None,
            "end": end,
            "restored": restored,
            **({"stopped_early": step} if self.stopped_early else {}),
        }
        self.best_state = None


def _score(r: dict, select_by: str = "accuracy") -> tuple[float, float]:
    """Larger is better. kl: lower KL to the FP32 model first (accuracy breaks a tie); a task that selects by
    its own measure (no "kl": embedding cosine to FP32, token/span F1) is compared by that measure."""
    if select_by == "kl" and "kl" in r:
        return (-r["kl"], r.get("accuracy", float("-inf")))
    return (r.get("accuracy", float("-inf")), -r.get("loss", 0.0))


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


def hidden_state_loss(student: tuple, teacher: tuple, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over layers of sum((s - t)^2) / sum(t^2) over non-padding tokens: the relative squared error of
    each layer's output. Index 0 (the embedding output, before any quantizer) is skipped."""
    m = attention_mask.unsqueeze(-1).to(student[-1].dtype) if attention_mask is not None else None
    terms = []
    for s, t in zip(student[1:], teacher[1:]):
        err, ref = (s - t).pow(2), t.pow(2)
        if m is not None:
            err, ref = err * m, ref * m
        terms.append(err.sum() / ref.sum().clamp_min(1e-12))
    return torch.stack(terms).mean()


def classification_objective(net, inputs: dict, labels: torch.Tensor, teacher: torch.nn.Module | None, cfg: TrainConfig) -> torch.Tensor:
    """Cross-entropy on the logits; with cfg.distill and a teacher, kd_loss against the teacher's logits."""
    logits = net(**inputs).logits
    if cfg.distill and teacher is not None:
        with torch.no_grad():
            t_logits = teacher(**inputs).logits
        return kd_loss(logits, t_logits, labels, cfg.kd_alpha, cfg.kd_temperature)
    return F.cross_entropy(logits, labels)


class _Recording:
    """Stands in for a model inside a task's objective: calls it with output_hidden_states=True and keeps
    the output, so the hidden-state term works with every task's own loss."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.out = model, None

    def __call__(self, **inputs):
        self.out = self.model(**inputs, output_hidden_states=True)
        return self.out


def batch_loss(objective: Callable[..., torch.Tensor], net, inputs: dict, labels: torch.Tensor, teacher, cfg: TrainConfig) -> torch.Tensor:
    """The task's loss of one batch; with distillation and cfg.kd_hidden > 0, plus kd_hidden x
    hidden_state_loss between the student's and the teacher's layer outputs (from the same forward passes)."""
    if teacher is None or cfg.kd_hidden <= 0:
        return objective(net, inputs, labels, teacher, cfg)
    student, frozen = _Recording(net), _Recording(teacher)
    loss = objective(student, inputs, labels, frozen, cfg)
    if frozen.out is None:
        raise ValueError("qat.kd_hidden: the task's objective did not run the FP32 teacher (qat.distill=false?)")
    return loss + cfg.kd_hidden * hidden_state_loss(student.out.hidden_states, frozen.out.hidden_states, inputs.get("attention_mask"))


def train(model: torch.nn.Module, tokenizer, data: Encoded, cfg: TrainConfig, **kwargs) -> TrainResult:
    """Train `model` in place (keyword arguments: _train's); with cfg.dropout false, every dropout of the model
    off while it trains (restored after)."""
    with contextlib.nullcontext() if cfg.dropout else without_dropout(model):
        return _train(model, tokenizer, data, cfg, **kwargs)


# Float dropout rates that Hugging Face modules keep outside torch's Dropout modules and pass to a functional
# dropout in training mode (ModernBERT's attention_dropout, DeBERTa's drop_prob).
_RATE_ATTRIBUTES = ("attention_dropout", "dropout_prob", "drop_prob", "dropout_p")


@contextlib.contextmanager
def without_dropout(model: torch.nn.Module):
    """Every dropout of `model` at rate 0 inside the block: torch's Dropout modules (Hugging Face attention
    reads their `p` for its functional dropout too) and the float rates in _RATE_ATTRIBUTES; restored after."""
    saved = []
    for m in model.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            saved.append((m, "p", m.p))
            m.p = 0.0
            continue
        for name in _RATE_ATTRIBUTES:
            if type(getattr(m, name, None)) is float:
                saved.append((m, name, getattr(m, name)))
                setattr(m, name, 0.0)
    try:
        yield
    finally:
        for m, name, value in saved:
            setattr(m, name, value)


def _train(
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
    objective: Callable[..., torch.Tensor] | None = None,
) -> TrainResult:
    """Train `model` in place (train() with its dropout setting).

    Args:
        checkpoint_dir: where checkpoints go (`<run>/checkpoints/<stage>/step-<N>/`).
        teacher: frozen FP32 model for distillation (cfg.distill).
        eval_fn: evaluation on a held-out split (returns {"accuracy", "loss"}): after each epoch when
            cfg.eval_each_epoch; at the start, every cfg.eval_every steps (null: a quarter of the run) and at
            the end when cfg.eval_every != 0 or cfg.keep_best (keep_best: the model ends in the best state seen).
        resume: a checkpoint folder (`.../step-<N>/`, see latest_checkpoint) to continue from.
        stop_after: stop (with a checkpoint) after this many steps — simulates an interruption in tests.
        objective: (net, inputs, labels, teacher, cfg) -> loss of one batch (the task's, pipeline/tasks/);
            None = classification_objective.
    """
    # Under torchrun (pipeline/distributed.py) every rank reads the same global batches and trains on its
    # slice of each (rows rank, rank + world, ...) through DistributedDataParallel, which averages the
    # gradients: steps, learning-rate schedule and effective batch size are those of a single process.
    world, rank = distributed.world_size(), distributed.rank()
    net = _wrap_ddp(model, device) if distributed.is_distributed() else model
    steps_per_epoch = math.ceil(len(data) / cfg.batch_size)
    total = cfg.max_steps or min(max(cfg.epochs * steps_per_epoch, cfg.min_steps or 0), cfg.cap_steps or math.inf)
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
    # eval_every null: a quarter of the run, so a short run and a long one both get four evaluations.
    every = cfg.eval_every if cfg.eval_every is not None else max(1, math.ceil(total / 4))
    selector = (
        _Selector(model, eval_fn, cfg.keep_best, result, desc, cfg.select_by) if eval_fn is not None and (cfg.keep_best or every) else None
    )
    if selector is not None and resume is None:
        selector(0)  # the start (after PTQ for QAT): the state to beat
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(
        total=total,
        initial=result.steps,
        desc=desc,
        unit="step",
        dynamic_ncols=True,
        mininterval=1.0,
        disable=not distributed.is_main_process(),
    )
    step = result.steps
    for epoch in range(step // steps_per_epoch, epochs):
        skip = step - epoch * steps_per_epoch  # batches of this epoch already done before a resume
        for i, batch in enumerate(
            batches(tokenizer, data, cfg.batch_size, shuffle=True, seed=seed + epoch, group_by_length=cfg.group_by_length)
        ):
            if i < skip:
                continue
            if step >= total:
                break
            batch = batch.to(device)
            inputs, labels = batch.inputs, batch.labels
            if world > 1:
                if len(labels) < world:
                    raise ValueError(
                        f"{desc}: a batch of {len(labels)} examples cannot be split over {world} ranks; "
                        "choose a batch_size / number of examples that leaves every rank at least one per batch"
                    )
                inputs, labels = {k: v[rank::world] for k, v in inputs.items()}, labels[rank::world]
            loss = batch_loss(objective or classification_objective, net, inputs, labels, teacher, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            step += 1
            # The loss of the whole global batch (mean over ranks), the same number on every rank.
            result.losses.append(distributed.all_reduce_(loss.detach().clone(), "sum").item() / world)
            bar.update(1)
            bar.set_postfix(
                loss=f"{result.losses[-1]:.4f}",
                ex_s=f"{cfg.batch_size * (step - result.resumed_from_step) / (time.perf_counter() - t0):.0f}",
            )
            if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or (stop_after is not None and step >= stop_after):
                result.steps = step
                if distributed.is_main_process():  # ranks hold identical weights: rank 0 saves
                    _save_checkpoint(checkpoint_dir, model, opt, sched, result)
            if stop_after is not None and step >= stop_after:
                bar.close()
                result.seconds += time.perf_counter() - t0
                return result
            if selector is not None and every and step % every == 0 and step < total:
                selector(step)
                if cfg.patience and selector.stale >= cfg.patience:
                    log.info("%s: no better state in %d evaluations: stopped at step %d (qat.patience)", desc, selector.stale, step)
                    selector.stopped_early = True
                    break
        if selector is not None and selector.stopped_early:
            break
        if cfg.eval_each_epoch and eval_fn is not None:
            r = selector(step) if selector is not None else _plain_eval(model, eval_fn)
            result.epoch_eval.append({"epoch": epoch + 1, "step": step, **{k: v for k, v in r.items() if k != "step"}})
            log.info("%s epoch %d: %s", desc, epoch + 1, result.epoch_eval[-1])
            model.train()
    bar.close()
    if selector is not None:
        selector.finish(step)  # the end; keep_best restores the best state before the final checkpoint
    model.eval()
    result.steps = step
    result.seconds += time.perf_counter() - t0
    if distributed.is_main_process():
        _save_checkpoint(checkpoint_dir, model, opt, sched, result)
    distributed.barrier()  # no rank moves on before the checkpoint exists
    return result


def _plain_eval(model: torch.nn.Module, eval_fn: Callable[[], dict]) -> dict:
    model.eval()
    r = eval_fn()
    model.train()
    return r


def _wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel over `model` (its parameters stay the model's own: saving and export use
    `model`). DDP broadcasts rank 0's weights and buffers at construction; later buffer broadcasts are
    off because quantizer amax buffers are already bit-identical on every rank (reduced calibration)."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    # Parameters that get no gradient in some step (e.g. unused heads, disabled quantizers' amax):
    # find_unused_parameters keeps DDP's gradient reduction from waiting for them.
    return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False, find_unused_parameters=True)


def state_for_safetensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict (weights + quantizer amax) in a form safetensors accepts."""
    return _dedupe({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()})


def _save_checkpoint(folder: Path, model, opt, sched, result: TrainResult) -> Path:
    """Write `folder/step-<N>/` as one unit: files go into a hidden temp folder that is renamed into
    place only when all are written, so a crash leaves the previous checkpoint intact and never a
    folder mixing step-N weights with older optimizer state. Older checkpoints are then removed.

    Contents (no pickles: a resume folder may come from anywhere, and loading a pickle runs code):
    model.safetensors (weights + quantizer amax), trainer_state.safetensors (optimizer tensors and
    RNG states) and trainer_state.json (the rest: scheduler, optimizer hyper-parameters, progress).
    Each file records the step; resume checks they agree.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(f".{_CKPT_PREFIX}*"):  # temp folders of a crashed earlier save
        shutil.rmtree(stale, ignore_errors=True)
    final = folder / f"{_CKPT_PREFIX}{result.steps:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=folder))
    try:
        tensors, state = _trainer_state(opt, sched)
        meta = {"step": str(result.steps)}
        save_file(state_for_safetensors(model), str(tmp / "model.safetensors"), metadata=meta)
        save_file(tensors, str(tmp / "trainer_state.safetensors"), metadata=meta)
        progress = {"step": result.steps, "losses": result.losses, "epoch_eval": result.epoch_eval, "seconds": result.seconds}
        (tmp / "trainer_state.json").write_text(json.dumps({**state, "progress": progress}))
        if final.exists():  # the same step saved twice (the final save after a periodic one): swap
            os.replace(final, folder / f".{final.name}.replaced")
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in [*folder.glob(f"{_CKPT_PREFIX}*"), *folder.glob(f".{_CKPT_PREFIX}*")]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _trainer_state(opt: torch.optim.Optimizer, sched) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer, scheduler and RNG states split into tensors (safetensors) and plain values (JSON)."""
    tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np_keys.astype(np.int64))  # uint32 words, widened
    py_version, py_words, py_gauss = random.getstate()
    tensors["rng.python"] = torch.tensor(py_words, dtype=torch.int64)
    opt_state = opt.state_dict()
    opt_plain: dict[str, dict] = {}
    for idx, entry in opt_state["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{idx}.{name}"] = value.detach().contiguous().cpu()
            else:
                opt_plain.setdefault(str(idx), {})[name] = value
    plain = {
        "optimizer": {"param_groups": opt_state["param_groups"], "state": opt_plain},
        "scheduler": sched.state_dict(),
        "rng": {"numpy": [np_pos, np_has_gauss, np_gauss], "python": [py_version, py_gauss]},
    }
    return tensors, plain


def _restore_trainer_state(tensors: dict[str, torch.Tensor], plain: dict, opt: torch.optim.Optimizer, sched) -> None:
    state: dict[int, dict] = {int(i): dict(v) for i, v in plain["optimizer"]["state"].items()}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    # JSON turned tuples (AdamW's betas) into lists: give every value the type the optimizer uses.
    groups = []
    for saved, current in zip(plain["optimizer"]["param_groups"], opt.param_groups):
        groups.append({k: tuple(v) if isinstance(current.get(k), tuple) else v for k, v in saved.items()})
    opt.load_state_dict({"state": state, "param_groups": groups})
    sched.load_state_dict(plain["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    np_pos, np_has_gauss, np_gauss = plain["rng"]["numpy"]
    np.random.set_state(("MT19937", tensors["rng.numpy"].numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    py_version, py_gauss = plain["rng"]["python"]
    random.setstate((py_version, tuple(int(w) for w in tensors["rng.python"].tolist()), py_gauss))


def _dedupe(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Tied weights (e.g. shared embeddings) share storage, which safetensors refuses: clone them.
    seen, out = set(), {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr() if v.numel() else None
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


class ResumeError(RuntimeError):
    """A resume folder whose checkpoint is incomplete or inconsistent."""


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint under `folder` (a stage's checkpoints/<stage>/), or None if there is none.

    Hidden temp folders (a save interrupted before its rename) are never considered. Only one
    checkpoint is kept, so there is no older one to fall back to: the newest is verified on load and
    refused if its files disagree (see _load_checkpoint).
    """
    found = sorted(p for p in Path(folder).glob(f"{_CKPT_PREFIX}*") if p.is_dir()) if Path(folder).is_dir() else []
    return found[-1] if found else None


def _verify_checkpoint(folder: Path) -> int:
    """The checkpoint's step, after checking every file is present and records that same step."""
    missing = [f for f in _CKPT_FILES if not (folder / f).is_file()]
    if missing:
        raise ResumeError(f"resume: checkpoint {folder} is incomplete (missing {', '.join(missing)}); refusing to resume from it")
    steps = {}
    for f in ("model.safetensors", "trainer_state.safetensors"):
        with safe_open(str(folder / f), framework="pt") as fh:
            steps[f] = (fh.metadata() or {}).get("step")
    steps["trainer_state.json"] = json.loads((folder / "trainer_state.json").read_text())["progress"]["step"]
    expected = folder.name.removeprefix(_CKPT_PREFIX)
    if not expected.isdigit() or any(str(s) != str(int(expected)) for s in steps.values()):
        found = ", ".join(f"{f}: {s}" for f, s in steps.items())
        raise ResumeError(f"resume: checkpoint {folder} mixes training steps ({found}; folder says {expected}); refusing to resume from it")
    return int(expected)


def _load_checkpoint(folder: Path, model, opt, sched) -> TrainResult:
    step = _verify_checkpoint(folder)
    # safetensors and JSON only: nothing in a resume folder can run code when loaded.
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    plain = json.loads((folder / "trainer_state.json").read_text())
    _restore_trainer_state(load_file(str(folder / "trainer_state.safetensors")), plain, opt, sched)
    progress = plain["progress"]
    return TrainResult(
        steps=step,
        losses=progress["losses"],
        epoch_eval=progress["epoch_eval"],
        seconds=progress["seconds"],
        resumed_from_step=step,
    )
