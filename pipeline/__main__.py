"""Hydra entry point: `qdq-pipeline [overrides]` or `python -m pipeline [overrides]`."""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from pipeline import distributed
from pipeline.distributed import is_main_process
from pipeline.objective import evaluate_objective
from pipeline.outputs import write_json
from pipeline.run import run_pipeline
from pipeline.schema import REPLACED, ConfigError
from pipeline.validation import validate

log = logging.getLogger("pipeline")
# The configs ship inside the package: pipeline/conf is a symlink to the top-level conf/ (the one copy
# users edit), and the wheel carries its files as package data, so the command finds them from any
# folder after a plain `pip install .`, editable or not.
CONF_DIR = str(Path(__file__).resolve().parent / "conf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Run one pipeline; returns the objective for sweepers such as Optuna (pipeline/objective.py): by
    default the quantized (INT8 / FP8) engine's accuracy, or with objective.metric=latency its p50
    latency under the accuracy floor objective.min_accuracy.

    In a multirun, a failing job is recorded (manifest.json status "failed" with the error) and the
    sweep goes on; the sweep report lists it. A single run fails loudly with a non-zero exit.
    """
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    scratch = None
    if distributed.is_distributed():
        run_dir, scratch = _rank_run_dir(run_dir, hc.mode)
    try:
        ctx = run_pipeline(cfg, run_dir)
    except Exception as exc:
        log.error("%s", exc)
        if hc.mode != RunMode.MULTIRUN or distributed.is_distributed():
            if isinstance(exc, ConfigError):  # the message says it all: no traceback, exit status 2
                print(f"error: {exc}", file=sys.stderr)
                raise SystemExit(2) from None
            raise
        if not (run_dir / "manifest.json").exists():  # failed before the run started (bad config)
            write_json(
                run_dir / "manifest.json",
                {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "stages": {}, "overrides": list(hc.overrides.task)},
            )
        return None
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    # What the sweeper optimizes (objective.metric: accuracy, or latency under an accuracy floor);
    # objective.json records it beside the run so the sweep report shows each trial's value.
    objective = evaluate_objective(validate(cfg).objective, ctx.metrics)
    if is_main_process():
        write_json(run_dir / "objective.json", objective.as_dict())
    return objective.value


def _rank_run_dir(run_dir: Path, mode: RunMode | None) -> tuple[Path, str | None]:
    """Under torchrun: check every rank named the same run folder; rank 0 runs in it, the others in a
    scratch folder of their own (removed at exit), so only rank 0 writes outputs."""
    if mode == RunMode.MULTIRUN:
        raise ConfigError(["multirun (-m) under torchrun is not supported: launch one torchrun per run (or use a launcher plugin)"])
    agreed = distributed.broadcast_object(str(run_dir))
    if agreed != str(run_dir):
        raise RuntimeError(f"rank {distributed.rank()} composed run folder {run_dir}, rank 0 {agreed}: ranks must agree on one")
    if distributed.is_main_process():
        return run_dir, None
    scratch = tempfile.mkdtemp(prefix=f"qdq-rank{distributed.rank()}-")
    return Path(scratch) / "run", scratch


def _agree_on_run_folder() -> None:
    """Before Hydra composes under torchrun: rank 0's clock for `${now:...}` (the timestamped run folder
    name) on every rank, and no Hydra files (.hydra/, job log) from ranks other than 0.

    Hydra re-registers its `now` resolver when it starts, over `hydra.core.utils.datetime.now()`; that
    module-level name is what gets pinned here (for this process only, and only under torchrun).
    """
    import datetime as dt

    import hydra.core.utils as hydra_utils

    agreed = distributed.agreed_now()

    class _AgreedClock(dt.datetime):
        @classmethod
        def now(cls, tz=None):  # noqa: ARG003 (datetime.now's signature)
            return agreed

    hydra_utils.datetime = _AgreedClock
    if not distributed.is_main_process():
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=stdout"]


def replaced_keys(argv: list[str]) -> list[str]:
    """Command-line overrides of keys that quant.rules replaced, each with the new spelling. Checked before
    Hydra composes: Hydra would refuse them as unknown keys without saying what replaced them."""
    errors = []
    for arg in argv:
        key = arg.lstrip("+~").split("=", 1)[0]
        for old, new in REPLACED.items():
            if key == old or key.startswith(old + "."):
                errors.append(f"{old}: {new}")
    return errors


def cli() -> None:
    errors = replaced_keys(sys.argv[1:])
    if errors:
        print(f"error: {ConfigError(errors)}", file=sys.stderr)
        raise SystemExit(2)
    if distributed.init_from_env():
        _agree_on_run_folder()
    try:
        main()
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    cli()
