"""GPU check: one command, one table. Runs every GPU path that does not need TensorRT.

On a machine with a CUDA GPU (torch + CUDA; no network, no TensorRT needed): the smoke pipeline with
torch on the GPU (fine-tune, calibration, a few QAT steps, fake-quant evaluation), quantizer numerics
GPU vs CPU, calibrators fed GPU tensors, ONNX Runtime's CUDA provider when the installed build has it,
fake-quant vs FP32 torch latency on the GPU, and TensorRT's availability check. Without a GPU it
says so and runs the same checks on the CPU (so the script itself is tested in CI).

    bash scripts/gpu_check.sh [--random-init] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.engines import ENGINES  # noqa: E402
from pipeline.quantization.calibrators import HistogramCalibrator, MaxCalibrator  # noqa: E402
from pipeline.quantization.tensor_quantizer import TensorQuantizer  # noqa: E402
from pipeline.schema import EngineConfig  # noqa: E402

ROWS: list[tuple[str, str, str]] = []


def check(name: str):
    def wrap(fn):
        t0 = time.perf_counter()
        try:
            detail = fn()
            ROWS.append((name, "ok", f"{detail} ({time.perf_counter() - t0:.1f} s)"))
        except Exception as exc:  # a failing check is a row, the others still run
            traceback.print_exc()
            ROWS.append((name, "FAIL", f"{type(exc).__name__}: {str(exc)[:160]}"))
        return fn

    return wrap


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--random-init", action="store_true", help="tiny random model (fast; for CI)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    gpu = torch.cuda.is_available()
    dev = torch.device("cuda" if gpu else "cpu")
    where = (
        f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
        if gpu
        else f"CPU FALLBACK: no CUDA GPU visible to torch {torch.__version__}; the same checks run on the CPU"
    )
    print(where, flush=True)
    out = args.out or Path(tempfile.mkdtemp(prefix="gpu_check_"))

    @check("quantizer numerics on device == CPU")
    def _():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 128, 96, generator=g) * 3
        w = torch.randn(96, 48, generator=g)
        per_t, per_c = TensorQuantizer("linear_input"), TensorQuantizer("linear_weight", axis=0)
        per_t.load_amax(torch.tensor(2.5))
        per_c.load_amax(w.abs().amax(1))
        a = (per_t(x.to(dev)).cpu() - per_t(x)).abs().max().item()
        b = (per_c.to(dev)(w.to(dev)).cpu() - per_c.cpu()(w)).abs().max().item()
        xg = x.to(dev).requires_grad_()
        per_t.to(dev)(xg).sum().backward()
        assert a < 1e-5 and b < 1e-5, (a, b)
        return f"max |diff| per-tensor {a:.1e}, per-channel {b:.1e}; STE grad on {dev.type}"

    @check("calibrators fed device tensors")
    def _():
        x = torch.randn(32, 128, 384, device=dev)
        h, m = HistogramCalibrator(), MaxCalibrator(8, None, False)
        h.collect(x)
        m.collect(x)
        amax = {k: float(h.compute_amax(k)) for k in ("percentile", "entropy", "mse")}
        return f"max {float(m.compute_amax()):.3f}, " + ", ".join(f"{k} {v:.3f}" for k, v in amax.items())

    ctx_box = {}

    @check(f"smoke pipeline, torch on {dev.type} (finetune, calibrate, QAT, eval, ORT engines)")
    def _():
        from hydra import compose, initialize_config_dir

        import pipeline  # noqa: F401
        from pipeline.run import run_pipeline

        overrides = ["experiment=smoke", f"device={dev.type}", "qat=default", "qat.max_steps=10", "cache=off", "benchmark.iters=5"]
        if args.random_init:
            overrides.append("model.random_init=true")
        with initialize_config_dir(config_dir=str(Path(__file__).resolve().parent.parent / "conf"), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        ctx = run_pipeline(cfg, out / "smoke")
        ctx_box["ctx"] = ctx
        st = {k: f"{v.seconds:.0f}s" for k, v in ctx.stages.items() if v.status == "done"}
        acc = ctx.metrics.accuracy
        return (
            f"acc fp32 {acc['fp32']:.3f} fake-quant {acc['fake_quant']:.3f} int8 engine {acc['int8']:.3f}; "
            f"parity {ctx.metrics.parity['argmax_agreement']:.3f}; stages {st}"
        )

    @check(f"fake-quant vs FP32 torch latency on {dev.type} (batch 8 x seq 128)")
    def _():
        ctx = ctx_box["ctx"]
        ids = torch.randint(1000, 20000, (8, 128), device=dev)
        feed = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        res = {}
        for name, model in (("fp32", ctx.fp32_model), ("fake_quant", ctx.model)):
            model.to(dev).eval()
            with torch.no_grad():
                for _ in range(3):
                    model(**feed)
                if gpu:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(10):
                    model(**feed)
                if gpu:
                    torch.cuda.synchronize()
            res[name] = (time.perf_counter() - t0) * 100
        return ", ".join(f"{k} {v:.2f} ms" for k, v in res.items()) + " (torch eager; fake quant is a simulation, not a speedup)"

    @check("ONNX Runtime CUDA provider")
    def _():
        import onnxruntime as ort

        avail = ort.get_available_providers()
        if "CUDAExecutionProvider" not in avail:
            return f"not in this onnxruntime build ({ort.__version__}: {', '.join(avail)}); skipped"
        from pipeline.engines.onnxruntime import OrtEngine

        ctx = ctx_box["ctx"]
        cfg = EngineConfig(name="onnxruntime", providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        e = OrtEngine(ctx.artifacts.onnx_int8, "int8", cfg, out)
        ids = torch.randint(1000, 20000, (8, 128)).numpy()
        feed = {"input_ids": ids, "attention_mask": ids * 0 + 1, "token_type_ids": ids * 0}
        call = e.bind(feed)
        for _ in range(3):
            call()
        t0 = time.perf_counter()
        for _ in range(20):
            call()
        return f"INT8 graph on {e.session.get_providers()[0]}: {(time.perf_counter() - t0) * 50:.2f} ms/batch (IO binding)"

    @check("TensorRT availability (engine=tensorrt validation)")
    def _():
        problems = ENGINES["tensorrt"]().check(EngineConfig(name="tensorrt"))
        return "available" if not problems else "not usable here, as expected: " + " | ".join(problems)

    w = max(len(r[0]) for r in ROWS)
    print(f"\n{where}\n")
    print(f"| {'check':{w}} | result | detail |\n|{'-' * (w + 2)}|--------|--------|")
    for name, status, detail in ROWS:
        print(f"| {name:{w}} | {status:6} | {detail} |")
    return 0 if all(r[1] == "ok" for r in ROWS) else 1


if __name__ == "__main__":
    sys.exit(main())
