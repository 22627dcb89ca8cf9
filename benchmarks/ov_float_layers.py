"""The INT8 engine's float layers in f32 vs the plugin's bf16, same run, interleaved: what decides
engine.inference_precision=auto (pipeline/engines/openvino.py float_layer_precision).

    python benchmarks/ov_float_layers.py RUN_DIR [--cells 1x32 1x128 8x32 8x128 32x32 32x128]

Builds RUN_DIR/model_int8.onnx twice with the pipeline's OpenVINO engine (engine.inference_precision=f32 and
=bf16; 2 threads), times both call by call on the same synthetic batches (pipeline.timing.interleaved, about
3 s per engine and cell) and prints p50 ms per cell and the f32 / bf16 ratio. Needs a CPU with bf16
(AMX or AVX512_BF16).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np

from pipeline.engines.openvino import build
from pipeline.schema import engine_config
from pipeline.timing import interleaved, synthetic_inputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a run folder with model_int8.onnx")
    ap.add_argument("--cells", nargs="+", default=["1x32", "1x128", "8x32", "8x128", "32x32", "32x128"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        engines = {
            p: build(
                args.run / "model_int8.onnx",
                "int8",
                engine_config("openvino", inference_precision=p, intra_op_threads=args.threads),
                Path(tmp),
            )
            for p in ("bf16", "f32")
        }
        print("| cell | iterations | bf16 p50 ms | f32 p50 ms | f32 / bf16 |\n|---|---|---|---|---|")
        for cell in args.cells:
            b, s = map(int, cell.split("x"))
            inputs = synthetic_inputs(np.random.default_rng(0), 30000, b, s)
            calls = {p: e.bind({k: inputs[k] for k in e.input_names if k in inputs}) for p, e in engines.items()}
            iters = max(10, min(60, 3000 * 8 // (b * s)))
            times = interleaved(calls, 3, iters)
            a, c = statistics.median(times["bf16"]), statistics.median(times["f32"])
            print(f"| b{b}×s{s} | {iters} | {a:.2f} | {c:.2f} | {c / a:.3f} |", flush=True)


if __name__ == "__main__":
    main()
