"""Should ONNX Runtime's INT8 graph quantize the softmax output P unsigned (0..255, today) or signed
(INT8 0..127, as TensorRT requires)? Same run, same quantizers, only P's Q/DQ differ: accuracy on the
run's eval split and latency at batch 8 x seq 128, the two sessions interleaved.

    python benchmarks/softmax_sign.py outputs/<run_name>/<time> [--iters 30]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from omegaconf import OmegaConf

from pipeline.engines.onnxruntime import OrtEngine
from pipeline.engines.trt_graphs import retype_qdq
from pipeline.inference import accuracy, engine_logits
from pipeline.schema import engine_config
from pipeline.validation import validate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--iters", type=int, default=30)
    args = ap.parse_args()
    import pipeline  # noqa: F401  (resolvers)
    from pipeline.data import encode, load_splits
    from pipeline.models import load_model

    cfg = validate(OmegaConf.load(args.run / "config.resolved.yaml"))
    splits = load_splits(cfg.data)
    tokenizer = load_model(cfg.model, splits.num_labels, __import__("torch").device("cpu")).tokenizer
    ev = encode(tokenizer, splits.eval, cfg.model.max_length)
    m = onnx.load(str(args.run / "model_int8.onnx"))
    changed = retype_qdq(m, "int8")  # uint8 P -> int8 P (scale amax/127); int8 Q/DQ unchanged
    engine_cfg = engine_config("onnxruntime", None, save_optimized=False)
    with tempfile.TemporaryDirectory() as tmp:
        signed = Path(tmp) / "model_int8_signed_p.onnx"
        onnx.save(m, str(signed))
        engines = {
            "unsigned P (uint8, 0..255)": OrtEngine(args.run / "model_int8.onnx", "int8", engine_cfg, Path(tmp)),
            "signed P (int8, 0..127)": OrtEngine(signed, "int8", engine_cfg, Path(tmp)),
        }
        acc = {k: accuracy(engine_logits(e, tokenizer, ev, 64), ev.labels) for k, e in engines.items()}
        rng = np.random.default_rng(0)
        feed = {
            "input_ids": rng.integers(1000, len(tokenizer), (8, 128)),
            "attention_mask": np.ones((8, 128), np.int64),
            "token_type_ids": np.zeros((8, 128), np.int64),
        }
        calls = {k: e.bind(feed) for k, e in engines.items()}
        times: dict[str, list[float]] = {k: [] for k in calls}
        for _ in range(5):
            for c in calls.values():
                c()
        for _ in range(args.iters):
            for k, c in calls.items():
                t0 = time.perf_counter()
                c()
                times[k].append((time.perf_counter() - t0) * 1000)
    print(f"run {args.run}; Q/DQ retyped: {changed}")
    print("| ONNX Runtime INT8 graph | accuracy % | p50 ms (b8 x s128) |\n|---|---|---|")
    for k in engines:
        print(f"| {k} | {100 * acc[k]:.2f} | {np.median(times[k]):.2f} |")


if __name__ == "__main__":
    main()
