"""Hydra entry point: `qdq-pipeline [overrides]` or `python -m pipeline [overrides]`."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from pipeline.run import run_pipeline
from pipeline.schema import ConfigError

log = logging.getLogger("pipeline")
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Run one pipeline; returns INT8 engine accuracy (the objective for sweepers such as Optuna)."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        ctx = run_pipeline(cfg, run_dir)
    except ConfigError as exc:
        log.error("%s", exc)
        raise
    return ctx.metrics.accuracy["int8"]


def cli() -> None:
    main()


if __name__ == "__main__":
    cli()
