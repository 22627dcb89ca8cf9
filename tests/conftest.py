"""Shared fixtures: compose the real conf/ with overrides, run the pipeline into a temp folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import pipeline  # noqa: F401  (registers the ${embedded_model:} resolver)
from pipeline.run import run_pipeline

CONF = Path(__file__).resolve().parent.parent / "conf"

# A tiny random BERT with the smoke experiment: a whole pipeline in a few seconds.
TINY = [
    "experiment=smoke",
    "model.random_init=true",
    "benchmark.batch_sizes=[1,2]",
    "benchmark.seq_lens=[16,32]",
    "benchmark.headline_batch=2",
    "benchmark.headline_seq=32",
    "benchmark.iters=2",
    "benchmark.warmup=1",
    "data.num_train=64",
    "data.num_eval=64",
    "data.num_calib=32",
    "calibration.batch_size=16",
]


def compose_cfg(overrides: list[str] | None = None) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides or [], return_hydra_config=False)


def run_tiny(tmp_path: Path, overrides: list[str] | None = None, name: str = "run"):
    cfg = compose_cfg(TINY + [f"cache.dir={tmp_path}/cache"] + (overrides or []))
    return run_pipeline(cfg, tmp_path / name)


@pytest.fixture
def tiny_run(tmp_path):
    return lambda overrides=None, name="run": run_tiny(tmp_path, overrides, name)
