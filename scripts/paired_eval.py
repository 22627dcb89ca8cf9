"""Paired comparison of finished runs' engines on their eval split: accuracy, the drop vs the FP32 engine,
its paired 95 % interval, and how many predictions differ — for runs made before the evaluate stage
reported it (metrics.json <task>.<label>, pipeline/tasks/sequence_classification.py).

    python scripts/paired_eval.py outputs/base16/ptq_qkv_mse outputs/base16/ptq_tune_slot

Rebuilds each run's ONNX Runtime engines from its model_fp32.onnx / model_int8.onnx (in a temporary folder:
the run folders are only read) and the eval split from its config.resolved.yaml.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from pipeline.context import RunContext
from pipeline.engines.onnxruntime import build
from pipeline.inference import engine_logits, paired_drop_ci95
from pipeline.stages import load
from pipeline.tasks import make_task
from pipeline.validation import validate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    args = ap.parse_args()
    for run in args.runs:
        raw = OmegaConf.load(run / "config.resolved.yaml")
        raw.tune.pop("per_role", None)  # runs before tune.calibrator_per replaced it (only the eval split is used)
        cfg = validate(raw)
        with tempfile.TemporaryDirectory() as tmp:
            ctx = RunContext(run_dir=Path(tmp), device=torch.device("cpu"), seed=cfg.seed, config_hash="paired_eval")
            ctx.task = make_task(cfg)
            load.run(cfg, ctx)
            ev = ctx.encoded["eval"]
            labels = np.asarray(ev.labels)
            out = {p: engine_logits(build(run / f"model_{p}.onnx", p, cfg.engine, Path(tmp)), ctx.tokenizer, ev, cfg.evaluate.batch_size)
                   for p in ("fp32", "int8")}  # fmt: skip
        ref, q = out["fp32"].argmax(-1) == labels, out["int8"].argmax(-1) == labels
        changed = int((out["fp32"].argmax(-1) != out["int8"].argmax(-1)).sum())
        print(
            f"{run}: FP32 {100 * ref.mean():.2f} %, INT8 {100 * q.mean():.2f} %, drop {100 * (ref.mean() - q.mean()):+.2f} "
            f"± {paired_drop_ci95(ref, q):.2f} pt (paired 95 %), {changed} of {len(q)} predictions differ"
        )


if __name__ == "__main__":
    main()
