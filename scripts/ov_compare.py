"""Time several OpenVINO models (IR .xml or ONNX) in one process, interleaved, on the same inputs.

Same-run ratios between graphs of different runs (e.g. one INT8 model with outlier splitting and one without)
on a shared machine: each round runs every model once, in turn, so drift hits them alike; prints the median
latency per model and each model's ratio to the first.

    python scripts/ov_compare.py runs/a/model_int8.openvino.xml runs/b/model_int8.openvino.xml --batch 8 --seq 128
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from pipeline.engines.openvino import OvEngine
from pipeline.schema import OpenVinoEngineConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", type=Path)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    engines = [OvEngine(m, "int8", OpenVinoEngineConfig(), m.parent / ".ov_compare") for m in args.models]
    ids = rng.integers(1000, 20000, size=(args.batch, args.seq))
    calls = []
    for e in engines:
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
        calls.append(e.bind({k: v for k, v in feed.items() if k in e.input_names}))
    times: list[list[float]] = [[] for _ in engines]
    for r in range(args.warmup + args.rounds):
        for i, call in enumerate(calls):
            t = time.perf_counter()
            call()
            if r >= args.warmup:
                times[i].append((time.perf_counter() - t) * 1e3)
    base = statistics.median(times[0])
    for m, ts in zip(args.models, times):
        med = statistics.median(ts)
        print(f"{m}: median {med:.2f} ms over {len(ts)} rounds (b{args.batch} x s{args.seq}), {med / base:.3f}x the first")


if __name__ == "__main__":
    main()
