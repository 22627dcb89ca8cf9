"""Where the time goes in OpenVINO, per layer type: this run's INT8 graph against another OpenVINO model
(e.g. the nncf_ptq peer) at one shape, from OpenVINO's own performance counters (PERF_COUNT).

    python benchmarks/ov_profile.py RUN_DIR --other RUN_DIR/peers/nncf_ptq.xml --batch 32 --seq 128

Prints, per model, the summed real time per (layer type, exec precision) over `--iters` inferences of the
same random token batch, interleaved (model A, model B, A, B, ...), and the wall p50 of each. Both models are
compiled alike (2 threads by default), each with its float-layer precision (`--precision`, `--other-precision`:
the plugin's own by default).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
from pathlib import Path

import numpy as np
import openvino as ov


def _inputs(compiled, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for port in compiled.inputs:
        name = port.get_any_name()
        if "mask" in name:
            out[name] = np.ones((batch, seq), dtype=np.int64)
        elif "type" in name:
            out[name] = np.zeros((batch, seq), dtype=np.int64)
        else:
            out[name] = rng.integers(1000, 2000, size=(batch, seq), dtype=np.int64)
    return out


def profile(paths: dict[str, tuple[Path, str]], batch: int, seq: int, iters: int, threads: int) -> dict[str, dict]:
    """paths: label -> (model, float-layer precision: default = the plugin's, else f32 / bf16 / f16)."""
    core = ov.Core()
    reqs = {}
    for label, (path, precision) in paths.items():
        props = {"PERF_COUNT": "YES", "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
        if precision != "default":  # as engine.inference_precision sets it
            props["INFERENCE_PRECISION_HINT"] = precision
        compiled = core.compile_model(core.read_model(str(path)), "CPU", props)
        reqs[label] = (compiled.create_infer_request(), _inputs(compiled, batch, seq))
    totals = {label: collections.Counter() for label in paths}
    walls = {label: [] for label in paths}
    for i in range(iters + 2):
        for label, (req, feed) in reqs.items():
            t0 = time.perf_counter()
            req.infer(feed)
            wall = (time.perf_counter() - t0) * 1000
            if i < 2:  # warm-up
                continue
            walls[label].append(wall)
            for info in req.get_profiling_info():
                if info.status == info.Status.EXECUTED:
                    totals[label][(info.node_type, info.exec_type)] += info.real_time.total_seconds() * 1000 / iters
    return {label: {"p50_ms": statistics.median(walls[label]), "by_type": totals[label]} for label in paths}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a run folder with model_int8.onnx")
    ap.add_argument("--other", type=Path, required=True, help="another OpenVINO model (.xml or .onnx)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    choices = ["default", "f32", "bf16", "f16"]
    ap.add_argument("--precision", default="default", choices=choices, help="float layers of ours (default: the plugin's)")
    ap.add_argument("--other-precision", default="default", choices=choices, help="float layers of the other model")
    args = ap.parse_args()
    models = {"ours": (args.run / "model_int8.onnx", args.precision), "other": (args.other, args.other_precision)}
    res = profile(models, args.batch, args.seq, args.iters, args.threads)
    keys = sorted(set(res["ours"]["by_type"]) | set(res["other"]["by_type"]), key=lambda k: -res["ours"]["by_type"].get(k, 0))
    print(f"b{args.batch} x s{args.seq}, {args.iters} iterations, float layers ours {args.precision} / other "
          f"{args.other_precision}, p50 wall: ours {res['ours']['p50_ms']:.2f} ms, other {res['other']['p50_ms']:.2f} ms")  # fmt: skip
    print("| layer type | exec type | ours ms | other ms |\n|---|---|---|---|")
    for k in keys:
        a, b = res["ours"]["by_type"].get(k, 0.0), res["other"]["by_type"].get(k, 0.0)
        if max(a, b) >= 0.05:
            print(f"| {k[0]} | {k[1]} | {a:.2f} | {b:.2f} |")
    print(f"| **sum of layers** | | {sum(res['ours']['by_type'].values()):.2f} | {sum(res['other']['by_type'].values()):.2f} |")


if __name__ == "__main__":
    main()
