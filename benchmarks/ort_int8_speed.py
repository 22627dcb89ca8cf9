"""Where the INT8 engine's time goes on ONNX Runtime CPU, and which graph rewrites make it faster.

Takes a run folder (its model_fp32.onnx / model_int8.onnx, and peers/ when the run built them) and
times, interleaved in one process with the pipeline's own session settings (engine=onnxruntime):
  fp32              model_fp32.onnx as exported (the run's baseline)
  int8              model_int8.onnx as exported (what the pipeline ran before this script's findings)
  int8_fused        model_int8.onnx + ONNX Runtime's transformer fusions (SkipLayerNormalization,
                    BiasGelu, LayerNormalization; no QOrdered* ops, which are CUDA-only)
  peers/*.onnx      ONNX Runtime's own quantizers, when present
over a batch x seq grid; `--profile` adds ORT's profiler: per-op-type milliseconds of one call of the
FP32 and INT8 graphs at the headline shape (what bounds the INT8/FP32 ratio).

    python benchmarks/ort_int8_speed.py outputs/<run>/<time> [--batches 1 8 32] [--seqs 32 128] [--iters 30] [--profile]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from pipeline.engines.onnxruntime import OrtEngine, transformer_fusions
from pipeline.schema import engine_config
from pipeline.timing import interleaved


def graphs(run: Path, tmp: Path) -> dict[str, Path]:
    out = {"fp32": run / "model_fp32.onnx", "int8": run / "model_int8.onnx"}
    out["int8_fused"] = transformer_fusions(run / "model_int8.onnx", tmp / "int8_fused.onnx")
    out.update({p.stem: p for p in sorted((run / "peers").glob("*.onnx")) if not p.name.endswith(".ort_optimized.onnx")})
    return out


def profile(path: Path, feed: dict, tmp: Path, calls: int = 10) -> dict[str, float]:
    """Mean milliseconds per call spent in each op type (ORT's profiler, after warm-up)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp / path.stem)
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    feed = {k: feed[k] for k in names}
    for _ in range(3):
        sess.run(None, feed)
    sess.end_profiling()
    so.enable_profiling = True
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    for _ in range(calls):
        sess.run(None, feed)
    events = json.loads(Path(sess.end_profiling()).read_text())
    per_op: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"] / 1000 / calls
    return dict(sorted(per_op.items(), key=lambda kv: -kv[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--seqs", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--only", nargs="*", help="labels to time (default: all)")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    cfg = engine_config("onnxruntime", None, save_optimized=False, transformer_fusions=False)  # each graph as listed
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        paths = graphs(args.run, tmp)
        if args.only:
            paths = {k: v for k, v in paths.items() if k in args.only}
        engines = {k: OrtEngine(p, "int8" if k != "fp32" else "fp32", cfg, tmp) for k, p in paths.items()}
        rows = {}
        for b in args.batches:
            for s in args.seqs:
                feed = {
                    "input_ids": rng.integers(1000, 30000, size=(b, s), dtype=np.int64),
                    "attention_mask": np.ones((b, s), dtype=np.int64),
                    "token_type_ids": np.zeros((b, s), dtype=np.int64),
                }
                times = interleaved({k: e.bind(feed) for k, e in engines.items()}, args.warmup, args.iters)
                rows[(b, s)] = {k: float(np.median(v)) for k, v in times.items()}
                print(f"b{b} s{s}: " + "  ".join(f"{k} {v:.2f}" for k, v in rows[(b, s)].items()), flush=True)
        print("\n| label | " + " | ".join(f"b{b}×s{s} ms (ratio)" for b, s in rows) + " |")
        print("|---|" + "---|" * len(rows))
        for k in engines:
            print(
                f"| {k} | "
                + " | ".join(f"{r[k]:.2f} ({r[k] / r['fp32']:.3f})" if "fp32" in r else f"{r[k]:.2f}" for r in rows.values())
                + " |"
            )
        if args.profile:
            b, s = 8, 128
            feed = {
                "input_ids": rng.integers(1000, 30000, size=(b, s), dtype=np.int64),
                "attention_mask": np.ones((b, s), dtype=np.int64),
                "token_type_ids": np.zeros((b, s), dtype=np.int64),
            }
            prof = {k: profile(p, feed, tmp) for k, p in paths.items() if k in engines and not k.endswith("_fused")}
            ops = sorted({op for p in prof.values() for op in p}, key=lambda op: -max(p.get(op, 0) for p in prof.values()))
            print(f"\nORT profiler, b{b}×s{s}, ms per call by op type (kernel time, 2 threads):")
            print("| op | " + " | ".join(prof) + " |\n|---|" + "---|" * len(prof))
            for op in ops:
                print(f"| {op} | " + " | ".join(f"{p.get(op, 0):.2f}" for p in prof.values()) + " |")
            print("| total | " + " | ".join(f"{sum(p.values()):.2f}" for p in prof.values()) + " |")


if __name__ == "__main__":
    main()
