"""Hydra entry point: `qdq-pipeline [overrides]` or `python -m pipeline [overrides]`."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from pipeline.outputs import write_json
from pipeline.run import run_pipeline
from pipeline.schema import ConfigError

log = logging.getLogger("pipeline")
# The configs ship inside the package: pipeline/conf is a symlink to the top-level conf/ (the one copy
# users edit), and the wheel carries its files as package data, so the command finds them from any
# folder after a plain `pip install .`, editable or not.
CONF_DIR = str(Path(__file__).resolve().parent / "conf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Run one pipeline; returns the quantized (INT8 / FP8) engine's accuracy (the objective for sweepers such as Optuna).

    In a multirun, a failing job is recorded (manifest.json status "failed" with the error) and the
    sweep goes on; the sweep report lists it. A single run fails loudly with a non-zero exit.
    """
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    try:
        ctx = run_pipeline(cfg, run_dir)
    except Exception as exc:
        log.error("%s", exc)
        if hc.mode != RunMode.MULTIRUN:
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
    return ctx.metrics.accuracy.get(ctx.metrics.engine_precisions["quantized"] or "int8")


def cli() -> None:
    main()


if __name__ == "__main__":
    cli()
