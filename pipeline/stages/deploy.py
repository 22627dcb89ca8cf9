"""deploy: the Triton model repository of the run, `triton/` in the run folder (pipeline/deploy/triton.py).

An ensemble named after the task (tokenizer -> model -> postprocess) per precision, in two variants:
triton/cpu for the Triton server bundled in PyPI's nvidia-pytriton (Python backend running this project's
ONNX Runtime engine; `qdq-pipeline-serve <run folder>`) and triton/nvidia for NVIDIA's Triton container
(onnxruntime / tensorrt_plan / openvino backends). Tokenization settings (tokenizer.json, max length,
truncation, padding, the graph's inputs) come from the run itself, so what is served is what was measured.
Written from the run's files only: nothing to cache (hard links, no computation).
"""

from __future__ import annotations

import logging

from pipeline.context import RunContext
from pipeline.deploy.predictor import serving_spec
from pipeline.deploy.triton import TritonSettings, write_repository
from pipeline.schema import RunConfig

log = logging.getLogger(__name__)


def run(cfg: RunConfig, ctx: RunContext) -> None:
    files = dict(ctx.artifacts.onnx)  # exported graphs by file name
    plans = {k.removesuffix("_plan"): v for k, v in ctx.artifacts.engine_files.items() if k.endswith("_plan")}
    spec = serving_spec(cfg, ctx.tokenizer, files, _label_names(cfg, ctx), plans)
    info = write_repository(spec, ctx.run_dir / "triton", TritonSettings.from_config(cfg.deploy))
    for repo, served in info["repositories"].items():
        log.info("deploy: triton/%s: %s", repo, ", ".join(f"{n} ({d['backend']}, {d['precision']})" for n, d in served.items()))
    if info.get("not_written"):
        log.info("deploy: no Triton ensemble: %s", info["not_written"])


def _label_names(cfg: RunConfig, ctx: RunContext) -> list[str]:
    """The class / tag names the model's outputs are indexed by (read by the load stage with the splits)."""
    splits = getattr(ctx, "splits", None)
    if splits is None:
        splits = ctx.task.load_splits(cfg.data)
    return list(splits.label_names)
