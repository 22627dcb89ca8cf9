"""GPU check: one command, one table. Runs every GPU path that does not need TensorRT, and checks TensorRT's graphs.

On a machine with a CUDA GPU (torch + CUDA; no network, no TensorRT needed): the smoke pipeline with
torch on the GPU (fine-tune, calibration, a few QAT steps, fake-quant evaluation), quantizer numerics
GPU vs CPU, calibrators fed GPU tensors, ONNX Runtime's CUDA provider, fake-quant vs FP32 torch latency
on the GPU, TensorRT's availability check, and the static TensorRT rules on the smoke run's TensorRT
graphs (model_fp16.onnx, model_int8_trt.onnx, model_fp8.onnx). Without a GPU it says so and runs the
same checks on the CPU (so the script itself is tested in CI).

Each row is `ok`, `skipped` (with why: a piece that is absent and was not asked for) or `FAIL`. A piece
that was asked for and is missing is a FAIL: `--require-cuda` (a CUDA GPU and ONNX Runtime's CUDA
provider), `--require-tensorrt` (TensorRT usable and its graphs present); where torch sees a GPU, CUDA is
required implicitly. The last line counts ok / skipped / failed; the exit status is 1 if anything failed.

    bash scripts/gpu_check.sh [--random-init] [--out DIR] [--require-cuda] [--require-tensorrt] [--only KEY,...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import NoReturn

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.engines import ENGINES  # noqa: E402
from pipeline.engines.trt_rules import check_tensorrt, gemm_quantization  # noqa: E402
from pipeline.quantization.calibrators import HistogramCalibrator, MaxCalibrator  # noqa: E402
from pipeline.quantization.tensor_quantizer import TensorQuantizer  # noqa: E402
from pipeline.schema import EngineConfig  # noqa: E402

ROWS: list[tuple[str, str, str]] = []
SELECTED: set[str] | None = None  # --only: the check keys to run (None = all)


class Skip(Exception):
    """A check that cannot run here and was not asked for: its row reads `skipped` and says why."""


class Missing(Exception):
    """A piece that was asked for (a --require-* flag, or CUDA on a GPU machine) is absent: the row is FAIL."""


def unavailable(why: str, required: bool, flag: str) -> NoReturn:
    """Ends a check whose piece is absent: FAIL when it was required (naming what required it), else skipped."""
    if required:
        raise Missing(f"required ({flag}) but missing: {why}")
    raise Skip(why)


def check(key: str, name: str):
    """Runs the decorated function now as one table row (ok / skipped / FAIL); the others still run."""

    def wrap(fn):
        if SELECTED is not None and key not in SELECTED:
            return fn
        t0 = time.perf_counter()
        try:
            detail = fn()
            ROWS.append((name, "ok", f"{detail} ({time.perf_counter() - t0:.1f} s)"))
        except Skip as why:
            ROWS.append((name, "skipped", str(why)[:500]))
        except Missing as exc:
            ROWS.append((name, "FAIL", str(exc)[:300]))
        except Exception as exc:  # a failing check is a row, the others still run
            traceback.print_exc()
            ROWS.append((name, "FAIL", f"{type(exc).__name__}: {str(exc)[:300]}"))
        return fn

    return wrap


def summary(rows: list[tuple[str, str, str]]) -> str:
    """The last line: how many rows passed, were skipped, failed."""
    n = {s: sum(r[1] == s for r in rows) for s in ("ok", "skipped", "FAIL")}
    return f"summary: {n['ok']} ok, {n['skipped']} skipped, {n['FAIL']} failed"


# --only keys, in table order.
KEYS = ("cuda", "numerics", "calibrators", "smoke", "latency", "ort-cuda", "tensorrt", "trt-graphs")
# The graphs the export writes for TensorRT (pipeline/engines/trt_graphs.py), checked when present.
TRT_GRAPH_FILES = ("model_fp16.onnx", "model_int8_trt.onnx", "model_fp8.onnx")


def main() -> int:
    """Runs the selected checks and prints one table; returns 1 if any row failed."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--random-init", action="store_true", help="tiny random model (fast; for CI)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--require-cuda", action="store_true", help="a missing CUDA GPU / ORT CUDA provider is a FAIL (implied where torch sees a GPU)"
    )
    ap.add_argument("--require-tensorrt", action="store_true", help="a missing TensorRT or missing TensorRT graphs is a FAIL")
    ap.add_argument("--only", default=None, help=f"comma-separated check keys to run ({', '.join(KEYS)}); default all")
    args = ap.parse_args()
    global SELECTED
    if args.only:
        SELECTED = {k.strip() for k in args.only.split(",")}
        if SELECTED - set(KEYS):
            ap.error(f"--only: unknown check {sorted(SELECTED - set(KEYS))}; one of {', '.join(KEYS)}")
    gpu = torch.cuda.is_available()
    # Where torch sees a GPU, the CUDA paths are what this script is for: their absence is a failure there.
    require_cuda = args.require_cuda or gpu
    dev = torch.device("cuda" if gpu else "cpu")
    where = (
        f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
        if gpu
        else f"CPU FALLBACK: no CUDA GPU visible to torch {torch.__version__}; the same checks run on the CPU"
    )
    print(where, flush=True)
    out = args.out or Path(tempfile.mkdtemp(prefix="gpu_check_"))

    @check("cuda", "CUDA device visible to torch")
    def _():
        if not gpu:
            unavailable("no CUDA GPU visible to torch: every check below ran on the CPU", require_cuda, "--require-cuda")
        return f"{torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}"

    @check("numerics", "quantizer numerics on device == CPU")
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

    @check("calibrators", "calibrators fed device tensors")
    def _():
        x = torch.randn(32, 128, 384, device=dev)
        h, m = HistogramCalibrator(), MaxCalibrator(8, None, False)
        h.collect(x)
        m.collect(x)
        amax = {k: float(h.compute_amax(k)) for k in ("percentile", "entropy", "mse")}
        return f"max {float(m.compute_amax()):.3f}, " + ", ".join(f"{k} {v:.3f}" for k, v in amax.items())

    ctx_box = {}

    @check("smoke", f"smoke pipeline, torch on {dev.type} (finetune, calibrate, QAT, eval, ORT engines)")
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

    def smoke_ctx():
        if "ctx" not in ctx_box:
            raise Skip("needs the smoke pipeline run (it failed above or was not selected with --only)")
        return ctx_box["ctx"]

    @check("latency", f"fake-quant vs FP32 torch latency on {dev.type} (batch 8 x seq 128)")
    def _():
        ctx = smoke_ctx()
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

    @check("ort-cuda", "ONNX Runtime CUDA provider")
    def _():
        import onnxruntime as ort

        avail = ort.get_available_providers()
        if "CUDAExecutionProvider" not in avail:
            why = f"CUDAExecutionProvider not in this onnxruntime build ({ort.__version__}: {', '.join(avail)})"
            unavailable(
                why + ("; pip install onnxruntime-gpu" if gpu else ""),
                require_cuda,
                "--require-cuda" if args.require_cuda else "a GPU is visible",
            )
        from pipeline.engines.onnxruntime import OrtEngine

        ctx = smoke_ctx()
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

    @check("tensorrt", "TensorRT availability (engine=tensorrt validation)")
    def _():
        problems = ENGINES["tensorrt"]().check(EngineConfig(name="tensorrt"))
        if problems:
            unavailable(" | ".join(problems), args.require_tensorrt, "--require-tensorrt")
        import tensorrt

        return f"TensorRT {tensorrt.__version__} usable on this GPU"

    @check("trt-graphs", "static TensorRT rules on the smoke run's TensorRT graphs")
    def _():
        ctx = smoke_ctx()
        run_dir = Path(getattr(ctx, "run_dir", out / "smoke"))
        graphs = [run_dir / f for f in TRT_GRAPH_FILES if (run_dir / f).exists()]
        if not graphs:
            why = f"no TensorRT graphs ({', '.join(TRT_GRAPH_FILES)}) in {run_dir}: the export writes them with export.tensorrt_graphs=true"
            unavailable(why, args.require_tensorrt, "--require-tensorrt")
        bad = [v.line(g.name) for g in graphs for v in check_tensorrt(g)]
        if bad:
            raise AssertionError(f"{len(bad)} violations: " + " | ".join(bad[:3]))
        gemms = {g.name: gemm_quantization(g) for g in graphs}
        return "legal: " + ", ".join(f"{n} ({c['quantized']}/{c['gemms']} GEMMs quantized)" for n, c in gemms.items())

    w = max([len(r[0]) for r in ROWS] + [5])
    print(f"\n{where}\n")
    print(f"| {'check':{w}} | result  | detail |\n|{'-' * (w + 2)}|---------|--------|")
    for name, status, detail in ROWS:
        print(f"| {name:{w}} | {status:7} | {detail} |")
    print(summary(ROWS))
    return 1 if any(r[1] == "FAIL" for r in ROWS) else 0


if __name__ == "__main__":
    sys.exit(main())
