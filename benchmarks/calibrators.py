"""Calibrator speed: our vectorized entropy / mse amax search vs pytorch-quantization 2.1.3.

Both collect the same batches into a 2048-bin histogram, then compute_amax is timed on each.
Prints both times, the ratio and both amax values (they must be the same bin).

    python benchmarks/calibrators.py [--batches 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from pipeline.quantization.calibrators import HistogramCalibrator
from pipeline.quantization.oracle import cpu_oracle


def _best_time(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--oracle-repeats", type=int, default=1, help="pq entropy takes seconds per call")
    args = parser.parse_args()
    torch.manual_seed(0)
    # Activation-like data: heavy-tailed (Student-t), several batches so the histogram grows.
    batches = [torch.distributions.StudentT(3.0).sample((64, 128, 96)) * (1 + 0.1 * i) for i in range(args.batches)]
    ours = HistogramCalibrator(8, None, False, num_bins=2048)
    with cpu_oracle() as calib:
        ref = calib.HistogramCalibrator(8, None, False, num_bins=2048)
        for b in batches:
            ours.collect(b)
            ref.collect(b)
        print(f"histogram bins after {args.batches} batches: ours {ours._calib_hist.numel()}, pq {ref._calib_hist.numel()}")
        print(f"{'method':8} {'pq 2.1.3 (s)':>13} {'ours (s)':>10} {'speedup':>9} {'amax pq':>10} {'amax ours':>10}")
        for method in ("entropy", "mse"):
            t_ref, a_ref = _best_time(lambda m=method: ref.compute_amax(m), args.oracle_repeats)
            t_our, a_our = _best_time(lambda m=method: ours.compute_amax(m), args.repeats)
            print(f"{method:8} {t_ref:13.3f} {t_our:10.4f} {t_ref / t_our:8.1f}x {float(a_ref):10.4f} {float(a_our):10.4f}")


if __name__ == "__main__":
    main()
