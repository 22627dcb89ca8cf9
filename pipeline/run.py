"""The stage loop: validate everything, then run the stages in order, recording each one."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from pipeline import __version__, distributed
from pipeline.cache import StageCache
from pipeline.context import RunContext, StageRecord
from pipeline.data import PREFLIGHT_SOURCES, DataError, DataSplits
from pipeline.engines import ENGINES, auto_engine
from pipeline.outputs import config_hash, write_json, write_text
from pipeline.schema import ConfigError, RunConfig, engine_config, symmetric_only
from pipeline.stages import benchmark, build_engine, calibrate, deploy, evaluate, export, finetune, load, qat, report, tune
from pipeline.tasks import Task, make_task
from pipeline.training import seed_everything
from pipeline.validation import validate

log = logging.getLogger(__name__)

# (name, stage, is it switched on?) — the recipe, in order.
STAGES: list[tuple[str, Callable[[RunConfig, RunContext], str | None], Callable[[RunConfig], bool]]] = [
    ("load", load.run, lambda c: True),
    ("finetune", finetune.run, lambda c: c.finetune.enabled),
    ("calibrate", calibrate.run, lambda c: c.calibration.method != "none"),
    ("tune", tune.run, lambda c: c.tune.enabled and c.calibration.method != "none"),
    # Under tune=auto, QAT is the tune stage's second step (taken only when the budget needs it).
    ("qat", qat.run, lambda c: c.qat.enabled and not (c.tune.method == "auto" and c.calibration.method != "none")),
    ("export", export.run, lambda c: c.export.enabled),
    ("build_engine", build_engine.run, lambda c: c.engine.name != "none"),
    ("evaluate", evaluate.run, lambda c: c.evaluate.enabled),
    ("benchmark", benchmark.run, lambda c: c.benchmark.enabled),
    ("deploy", deploy.run, lambda c: c.deploy.enabled and c.export.enabled),
    ("report", report.run, lambda c: True),
]


def preflight(cfg: RunConfig, task: Task | None = None) -> DataSplits | None:
    """Checks that need the environment (packages, GPU, files): still before any stage runs.

    Local data (data=csv, the embedded snippets) is read here and every row checked, so bad data stops
    before the run folder exists; the validated splits are returned for the load stage (read once).
    """
    errors: list[str] = []
    if cfg.engine.name != "none":
        # engine=auto is resolved by run_pipeline; the Hydra callback checks before that, on the same rule
        name = auto_engine()[0] if cfg.engine.name == "auto" else cfg.engine.name
        errors += ENGINES[name]().check(cfg.engine)
    splits = None
    if cfg.data.source in PREFLIGHT_SOURCES:
        try:
            splits = (task or make_task(cfg)).load_splits(cfg.data)
        except DataError as exc:
            errors += exc.errors
    src = cfg.model.name_or_path
    if not cfg.model.random_init and src.startswith(("/", ".", "~")) and not Path(src).expanduser().exists():
        errors.append(f"model.name_or_path: folder not found: {src}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        errors.append("device: cuda requested but torch sees no GPU; valid here: auto, cpu")
    if errors:
        raise ConfigError(errors)
    return splits


def resolve_device(name: str) -> torch.device:
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name))


def run_pipeline(raw: DictConfig, run_dir: Path) -> RunContext:
    """Validate `raw`, then run every stage into `run_dir`. Raises ConfigError before any work."""
    cfg = validate(raw)
    choice = _resolve_engine(cfg)
    task = make_task(cfg)  # one task object for the run: it may learn from the data (e.g. the tag names)
    splits = preflight(cfg, task)
    digest = config_hash(raw)
    resume_from = _check_resume(Path(cfg.resume).expanduser(), digest) if cfg.resume else None
    main_rank = distributed.is_main_process()  # under torchrun, other ranks get a scratch run_dir
    if main_rank and (run_dir / "manifest.json").exists():
        raise FileExistsError(f"{run_dir} already holds a run; refusing to overwrite it")
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)  # before load: random_init weights and fresh task heads depend on it
    device = distributed.device_for_rank(resolve_device(cfg.device))
    ctx = RunContext(run_dir=run_dir, device=device, seed=cfg.seed, config_hash=digest, resume_from=resume_from, task=task)
    ctx.metrics.engine_choice = choice
    _resolve_weight_range(cfg, ctx)
    _resolve_activations(cfg, ctx)
    ctx.splits = splits  # validated by the pre-flight (None for hub data: the load stage reads it)
    # Off under torchrun: a hit on one rank and a miss on another would hang the collectives.
    use_cache = cfg.cache.enabled and resume_from is None and not distributed.is_distributed()
    if cfg.cache.enabled and distributed.is_distributed() and main_rank:
        log.info("cache: off for a multi-process run (every rank must run the same stages)")
    ctx.cache = StageCache(Path(cfg.cache.dir).expanduser(), use_cache, None if cfg.cache.max_gb is None else int(cfg.cache.max_gb * 1e9))
    write_text(run_dir / "config.resolved.yaml", OmegaConf.to_yaml(raw, resolve=True))
    started = time.time()
    _write_manifest(ctx, raw, started, None)
    error = None
    try:
        for name, stage, enabled in STAGES:
            if not main_rank and name not in distributed.COLLECTIVE_STAGES:
                break  # export, engines, evaluation, benchmark and report: rank 0 alone
            if not enabled(cfg):
                ctx.stages[name] = StageRecord("skipped", 0.0)
                continue
            t0 = time.perf_counter()
            try:
                status = stage(cfg, ctx) or "done"  # a stage restored from the cache returns "cached"
            except BaseException:
                ctx.stages[name] = StageRecord("failed", time.perf_counter() - t0)
                raise
            ctx.stages[name] = StageRecord(status, time.perf_counter() - t0)
            _write_manifest(ctx, raw, started, None)
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        report.write_metrics(cfg, ctx)
        _write_manifest(ctx, raw, started, error)
    return ctx


def _resolve_engine(cfg: RunConfig) -> dict:
    """engine=auto -> the CPU engine for this machine, before any stage (weight range, peers and graphs
    follow the resolved engine); metrics.json engine_choice records what was asked, chosen and why."""
    asked = cfg.engine.name
    if asked != "auto":
        return {"asked": asked, "chosen": asked, "why": "set by engine"}
    chosen, why = auto_engine()
    cfg.engine = engine_config(chosen, cfg.engine)
    log.info("engine=auto -> %s (%s)", chosen, why)
    return {"asked": asked, "chosen": chosen, "why": why}


def _resolve_weight_range(cfg: RunConfig, ctx: RunContext) -> None:
    """quant.weight_range=auto -> full or reduced for this engine on this machine, before any stage (the
    calibrate stage's cache key holds the resolved value); metrics.json records the choice and why."""
    asked = cfg.quant.weight_range
    if asked != "auto":
        resolved, why = asked, "set by quant.weight_range"
    elif cfg.engine.name == "none":
        resolved, why = "full", "engine=none: no int8 kernels run"
    else:
        resolved, why = ENGINES[cfg.engine.name]().weight_range(cfg.engine)
    if cfg.quant.format != "int8":
        resolved, why = "full", f"quant.format={cfg.quant.format}: the weight range applies to int8 only"
    cfg.quant.weight_range = resolved
    ctx.metrics.quantization.weight_range = {"asked": asked, "resolved": resolved, "why": why}
    log.info("quant.weight_range=%s -> %s (%s)", asked, resolved, why)


def _resolve_activations(cfg: RunConfig, ctx: RunContext) -> None:
    """quant.activations=auto -> asymmetric (CPU engines: uint8 with a zero point) or symmetric (TensorRT, fp8,
    learnable amax), before any stage (the calibrate stage's cache key holds the resolved value)."""
    asked, blocker = cfg.quant.activations, symmetric_only(cfg)
    if asked != "auto":
        resolved, why = asked, "set by quant.activations"
    elif blocker:
        resolved, why = "symmetric", blocker
    else:
        engine = cfg.engine.name if cfg.engine.name != "onnxruntime" else f"onnxruntime ({cfg.engine.providers[0]})"
        resolved, why = "asymmetric", f"engine {engine}: CPU int8 GEMMs take uint8 activations with a zero point (u8 x s8)"
    cfg.quant.activations = resolved
    ctx.metrics.quantization.activations = {"asked": asked, "resolved": resolved, "why": why}
    log.info("quant.activations=%s -> %s (%s)", asked, resolved, why)


def _check_resume(folder: Path, config_hash: str) -> Path:
    """The run to resume must have been started with the same config (resume itself excluded)."""
    old = json.loads((folder / "manifest.json").read_text())
    if old.get("config_hash") != config_hash:
        raise ConfigError(
            [
                f"resume: {folder} was run with a different config (hash {str(old.get('config_hash'))[:12]} vs "
                f"{config_hash[:12]}); resume with the same overrides as that run"
            ]
        )
    return folder


def _peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _versions() -> dict[str, str | None]:
    out = {}
    for pkg in ("torch", "transformers", "onnx", "onnxruntime", "tensorrt", "hydra-core", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5
        )
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if sha.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _write_manifest(ctx: RunContext, raw: DictConfig, started: float, error: str | None) -> None:
    device = str(ctx.device)
    if ctx.device.type == "cuda":
        device += f" ({torch.cuda.get_device_name(ctx.device)})"
    write_json(
        ctx.run_dir / "manifest.json",
        {
            "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
            "config_hash": ctx.config_hash,
            "seed": ctx.seed,
            "versions": _versions(),
            "device": device,
            "host": {
                "platform": platform.platform(),
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
            },
            "project": {"version": __version__, "git_commit": _git_commit()},
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            "status": "failed" if error else ("done" if "report" in ctx.stages else "running"),
            "error": error,
            "resumed_from": str(ctx.resume_from) if ctx.resume_from else None,
            "peak_rss_mb": round(_peak_rss_mb(), 1),
            "stages": {k: {"status": v.status, "seconds": round(v.seconds, 3)} for k, v in ctx.stages.items()},
            # Weights the checkpoint did not provide (re-initialized) or that went unused; null before load.
            "model_load": dataclasses.asdict(ctx.model_load) if ctx.model_load else None,
        },
    )
