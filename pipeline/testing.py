"""Helpers shared by the test suite, scripts/ and benchmarks/: compose the real configs (the ones the
`qdq-pipeline` command uses) and run a whole pipeline on a tiny random model in a few seconds.

Tools import these from the package, never from tests/, so they work without the test suite.
"""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import pipeline  # noqa: F401  (registers the ${embedded_model:} resolver)
from pipeline.__main__ import CONF_DIR
from pipeline.context import RunContext
from pipeline.run import run_pipeline

# The configs the command composes (pipeline/conf -> the top-level conf/).
CONF = Path(CONF_DIR)

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
    # ONNX Runtime's own quantizers are built and timed only where a test asks (tests/test_peers.py).
    "benchmark.peers=[]",
    # One engine on every machine (engine=auto picks by CPU); tests of other engines ask for them.
    "engine=onnxruntime",
    # The Triton repository is written where a test asks (tests/test_predict.py, tests/test_serving.py).
    "deploy=none",
    # The recipe as configured (tune=auto, the default, decides per model: tests of it ask for it).
    "tune=none",
    "qat=default",
]


def compose_cfg(overrides: list[str] | None = None, *, return_hydra_config: bool = False) -> DictConfig:
    """The config `qdq-pipeline <overrides>` would run (hydra.* included only when asked)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides or [], return_hydra_config=return_hydra_config)


def run_tiny(root: Path, overrides: list[str] | None = None, name: str = "run") -> RunContext:
    """Run the TINY pipeline (+ overrides) into root/name, with its stage cache under root/cache."""
    cfg = compose_cfg(TINY + [f"cache.dir={root}/cache"] + (overrides or []))
    return run_pipeline(cfg, Path(root) / name)
