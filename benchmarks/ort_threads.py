"""Why the engine and benchmark settings are what they are: ONNX Runtime FP32 vs INT8 latency of a
run's ONNX files (batch 8 x seq 128, the two sessions interleaved) with
  1. intra-op spinning on (ORT's default) vs off (engine.allow_spinning=false, our default),
  2. a live torch OpenMP pool in the same process (as after training) vs torch at one thread.

    python benchmarks/ort_threads.py outputs/<run_name>/<time> [--iters 20]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _session(path: Path, spinning: bool):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def measure(run: Path, spinning: bool, torch_pool: str, iters: int) -> dict[str, float]:
    if torch_pool != "absent":
        import torch

        a = torch.randn(512, 512)
        for _ in range(50):  # starts torch's OpenMP pool, as training/evaluation do
            a @ a
        if torch_pool == "one-thread":
            torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    feed = {
        "input_ids": rng.integers(1000, 30000, (8, 128)),
        "attention_mask": np.ones((8, 128), np.int64),
        "token_type_ids": np.zeros((8, 128), np.int64),
    }
    sessions = {p: _session(run / f"model_{p}.onnx", spinning) for p in ("fp32", "int8")}
    for s in sessions.values():
        names = {i.name for i in s.get_inputs()}
        for _ in range(3):
            s.run(None, {k: v for k, v in feed.items() if k in names})
    times: dict[str, list[float]] = {p: [] for p in sessions}
    for _ in range(iters):
        for p, s in sessions.items():
            names = {i.name for i in s.get_inputs()}
            t0 = time.perf_counter()
            s.run(None, {k: v for k, v in feed.items() if k in names})
            times[p].append((time.perf_counter() - t0) * 1000)
    return {p: float(np.median(t)) for p, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--case", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:  # one case per fresh process, so earlier cases leave no threads behind
        r = measure(args.run, args.case[0] == "on", args.case[1], args.iters)
        print(f"{r['fp32']:.1f} {r['int8']:.1f}")
        return
    print("| ORT spinning | torch pool in process | FP32 p50 ms | INT8 p50 ms | INT8 / FP32 |\n|---|---|---|---|---|")
    for spin, pool in (("on", "absent"), ("off", "absent"), ("off", "live"), ("off", "one-thread")):
        out = subprocess.run(
            [sys.executable, __file__, str(args.run), "--iters", str(args.iters), "--case", spin, pool],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        fp32, int8 = map(float, out)
        print(f"| {spin} | {pool} | {fp32:.1f} | {int8:.1f} | {int8 / fp32:.2f} |", flush=True)


if __name__ == "__main__":
    main()
