"""GPU acceptance check: one command, one table, a JSON record and a log in one folder.

    bash scripts/gpu_check.sh [--random-init] [--out DIR] [--require-cuda] [--require-tensorrt] [--only KEY,...]

Rows, in order (`--only` keys in brackets):

    [probe]        GPU, driver, compute capability, torch / CUDA, TensorRT and ONNX Runtime versions and providers
    [cuda]         a CUDA device visible to torch
    [numerics]     quantizer numerics on the device == CPU; [calibrators] calibrators fed device tensors
    [smoke]        the smoke pipeline with torch on the device: fine-tune, calibration, QAT steps, fake-quant eval
    [latency]      fake-quant vs FP32 torch latency on the device
    [ort-cuda]     ONNX Runtime's CUDA provider on model_int8.onnx: really on CUDA (no silent CPU fallback), and
                   whether its INT8 is emulated (float GEMMs between Q/DQ) or proven by a CUDA INT8 kernel
    [tensorrt]     TensorRT usable here (the engine=tensorrt validation)
    [trt-graphs]   static TensorRT rules on the smoke run's TensorRT graphs
    [trt-int8]     engine=tensorrt on the smoke setting, INT8: both plans exist, INT8 plan accuracy vs fake-quant torch
    [trt-layers]   INT8 tensors counted from the plan's engine inspector (a plan with none ran its GEMMs in float)
    [trt-parity]   the INT8 plan vs ONNX Runtime CPU on the same model_int8_trt.onnx (argmax agreement, cosine)
    [trt-shapes]   shapes (1, 1), (3, 77), (64, 128) run; one outside the profile is refused with a clear message
    [trt-cache]    a rebuild whose timing cache file is foreign (another GPU / version): fresh cache, plan written
    [trt-latency]  CUDA-event latency of the INT8 and FP16 plans at batch 1 / 8 / 32 x seq 128
    [trt-fp8]      compute capability >= 8.9: engine=tensorrt with quant.format=fp8: plans, FP8 tensors in the inspector
    [ort-trt]      ONNX Runtime's TensorRT provider on model_int8_trt.onnx with the engine's profile (where its build has it)
    [time]         the whole check within --time-budget seconds (8 minutes on one H100)

Each row is `ok`, `skipped` (with why: a piece that is absent and was not asked for) or `FAIL`. A piece that was
asked for and is missing is a FAIL: `--require-cuda` (a CUDA GPU and ONNX Runtime's CUDA provider),
`--require-tensorrt` (TensorRT usable, its plans built and run); where torch sees a GPU, CUDA is required
implicitly. Without a GPU the torch rows run on the CPU and every GPU row is skipped, saying why. The last line
counts ok / skipped / failed; the exit status is 1 if any row failed. `<out>/gpu_check.json` holds every row with its
measured data and the probe; gpu_check.sh also writes `<out>/gpu_check.log` (stdout and stderr, TensorRT's log
included).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import traceback
from datetime import datetime
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.engines import ENGINES  # noqa: E402
from pipeline.engines.base import cpu_model_name  # noqa: E402
from pipeline.engines.trt_rules import check_tensorrt, gemm_quantization  # noqa: E402
from pipeline.quantization.calibrators import HistogramCalibrator, MaxCalibrator  # noqa: E402
from pipeline.quantization.tensor_quantizer import TensorQuantizer  # noqa: E402
from pipeline.schema import engine_config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ROWS: list[tuple[str, str, str]] = []
RECORDS: list[dict] = []  # the JSON rows: key, name, status, detail, seconds, data
SELECTED: set[str] | None = None  # --only: the check keys to run (None = all)

# --only keys, in table order.
KEYS = (
    "probe",
    "cuda",
    "numerics",
    "asym-sync",
    "calibrators",
    "smoke",
    "latency",
    "ort-cuda",
    "tensorrt",
    "trt-graphs",
    "trt-int8",
    "trt-layers",
    "trt-parity",
    "trt-shapes",
    "trt-cache",
    "trt-latency",
    "trt-fp8",
    "ort-trt",
    "time",
)
# The graphs the export writes for TensorRT (pipeline/engines/trt_graphs.py), checked when present.
TRT_GRAPH_FILES = ("model_fp16.onnx", "model_int8_trt.onnx", "model_fp8.onnx")
# Pass marks of the TensorRT rows (decisions, not 1e-5: near-tie roundings flip between implementations).
MAX_ACCURACY_GAP = 0.02  # INT8 / FP8 plan vs fake-quant torch, absolute
MIN_AGREEMENT, MIN_COSINE = 0.95, 0.99  # INT8 plan vs ONNX Runtime CPU on the same graph
SHAPES = ((1, 1), (3, 77), (64, 128))
LATENCY_BATCHES, LATENCY_SEQ = (1, 8, 32), 128


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
    """Runs the decorated function now as one table row (ok / skipped / FAIL); the others still run.

    The function returns the row's detail, or (detail, data) where data goes to gpu_check.json.
    """

    def wrap(fn):
        if SELECTED is not None and key not in SELECTED:
            return fn
        t0 = time.perf_counter()
        data = None
        try:
            result = fn()
            detail, data = result if isinstance(result, tuple) else (result, None)
            status, detail = "ok", f"{detail} ({time.perf_counter() - t0:.1f} s)"
        except Skip as why:
            status, detail = "skipped", str(why)[:500]
        except Missing as exc:
            status, detail = "FAIL", str(exc)[:500]
        except Exception as exc:  # a failing check is a row, the others still run
            traceback.print_exc()
            status, detail = "FAIL", f"{type(exc).__name__}: {str(exc)[:400]}"
        print(f"[{status}] {name}: {detail}", file=sys.stderr, flush=True)
        ROWS.append((name, status, detail))
        RECORDS.append(
            {"key": key, "name": name, "status": status, "detail": detail, "seconds": round(time.perf_counter() - t0, 2), "data": data}
        )
        return fn

    return wrap


def summary(rows: list[tuple[str, str, str]]) -> str:
    """The last line: how many rows passed, were skipped, failed."""
    n = {s: sum(r[1] == s for r in rows) for s in ("ok", "skipped", "FAIL")}
    return f"summary: {n['ok']} ok, {n['skipped']} skipped, {n['FAIL']} failed"


def probe() -> dict:
    """What this machine has: GPU, driver, capability, torch / CUDA, TensorRT, ONNX Runtime and its providers, CPU."""
    from pipeline.engines.onnxruntime import installed_tensorrt
    from pipeline.engines.tensorrt import driver_version, tensorrt_cuda_major

    info: dict = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda}
    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0))) if torch.cuda.is_available() else None
    info["gpus"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
    info["driver"] = driver_version()
    try:
        import tensorrt

        info["tensorrt"] = str(tensorrt.__version__)
    except Exception as exc:  # absent, or present but its libraries / driver do not load
        info["tensorrt"] = None
        info["tensorrt_import_error"] = f"{type(exc).__name__}: {exc}"[:300]
        info["tensorrt_installed"] = installed_tensorrt()
    info["tensorrt_cuda_major"] = tensorrt_cuda_major()
    try:
        import onnxruntime as ort

        info["onnxruntime"] = ort.__version__
        info["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        info["onnxruntime"], info["onnxruntime_providers"] = None, []
    info["cpu"] = cpu_model_name()
    return info


def synthetic(batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random token ids without padding, (batch, seq) int64."""
    rng = np.random.default_rng(seed)
    return {
        "input_ids": rng.integers(1000, 20000, size=(batch, seq), dtype=np.int64),
        "attention_mask": np.ones((batch, seq), dtype=np.int64),
        "token_type_ids": np.zeros((batch, seq), dtype=np.int64),
    }


def compose_run(overrides: list[str], run_dir: Path):
    """The project's own config (conf/) with overrides, run as one pipeline run in `run_dir`."""
    from hydra import compose, initialize_config_dir

    import pipeline  # noqa: F401
    from pipeline.run import run_pipeline

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return cfg, run_pipeline(cfg, run_dir)


def inspector_counts(inspector_json: Path, dtype: str) -> dict[str, int]:
    """Layers whose inputs are `dtype` (int8 / fp8) in a plan's inspector JSON: plain layers by stated precision,
    fused Myelin layers by their boundary inputs (the precision of their inner GEMMs is not stated)."""
    from pipeline.engines.tensorrt import parse_inspector

    s = parse_inspector(json.loads(inspector_json.read_text()))
    return {
        "layers": len(s["layers"]),
        f"layers_{dtype}": s["by_precision"].get(dtype, 0),
        f"gemm_{dtype}": s["gemm_by_precision"].get(dtype, 0),
        f"fused_with_{dtype}_inputs": sum(1 for r in s["layers"] if r["fused"] and dtype in r["inputs"]),
        "gemm_unknown": s["gemm_unknown"],
    }


def main() -> int:
    """Runs the selected checks, prints one table, writes gpu_check.json; returns 1 if any row failed."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--random-init", action="store_true", help="tiny random model (fast; for CI)")
    ap.add_argument("--out", type=Path, default=None, help="folder for gpu_check.json, the runs and (from gpu_check.sh) the log")
    ap.add_argument(
        "--require-cuda", action="store_true", help="a missing CUDA GPU / ORT CUDA provider is a FAIL (implied where torch sees a GPU)"
    )
    ap.add_argument("--require-tensorrt", action="store_true", help="a missing TensorRT, or TensorRT plans not built and run, is a FAIL")
    ap.add_argument("--only", default=None, help=f"comma-separated check keys to run ({', '.join(KEYS)}); default all")
    ap.add_argument("--time-budget", type=float, default=480.0, help="seconds the whole check may take on a GPU (default 8 min)")
    args = ap.parse_args()
    global SELECTED
    if args.only:
        SELECTED = {k.strip() for k in args.only.split(",")}
        if SELECTED - set(KEYS):
            ap.error(f"--only: unknown check {sorted(SELECTED - set(KEYS))}; one of {', '.join(KEYS)}")
    t_start = time.perf_counter()
    started = datetime.now().isoformat(timespec="seconds")
    gpu = torch.cuda.is_available()
    # Where torch sees a GPU, the CUDA paths are what this script is for: their absence is a failure there.
    require_cuda = args.require_cuda or gpu
    cuda_flag = "--require-cuda" if args.require_cuda else "a GPU is visible"
    dev = torch.device("cuda" if gpu else "cpu")
    where = (
        f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
        if gpu
        else f"CPU FALLBACK: no CUDA GPU visible to torch {torch.__version__}; the torch checks run on the CPU, every GPU row is skipped"
    )
    print(where, flush=True)
    out = (args.out or Path(tempfile.mkdtemp(prefix="gpu_check_"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cache = [f"cache.dir={out / 'stage_cache'}"]  # the TensorRT runs reuse the smoke run's training stages
    box: dict = {}

    @check("probe", "probe: GPU, driver, capability, TensorRT / ONNX Runtime and providers")
    def _():
        info = box["probe"] = probe()
        trt = info["tensorrt"] or f"not importable ({info.get('tensorrt_installed') or 'not installed'})"
        gpu_txt = f"{info['gpu']} (cc {info['capability']}, driver {info['driver']})" if info["gpu"] else "no GPU"
        return (
            f"{gpu_txt}; torch {info['torch']} CUDA {info['torch_cuda']}; TensorRT {trt}; onnxruntime {info['onnxruntime']} {info['onnxruntime_providers']}",
            info,
        )

    @check("cuda", "CUDA device visible to torch")
    def _():
        if not gpu:
            unavailable("no CUDA GPU visible to torch: the torch checks below ran on the CPU", require_cuda, "--require-cuda")
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

    @check("asym-sync", "asymmetric fake quant on device: CPU values, no host sync in forward/backward")
    def _():
        g = torch.Generator().manual_seed(1)
        x = torch.nn.functional.gelu(torch.randn(64, 128, 96, generator=g) * 3)
        q = TensorQuantizer("linear_input", asymmetric=True)
        q.calibrating = True
        q(x)
        q.calibrating = False
        q.load_amax(torch.tensor(4.0))
        cpu = q(x)
        q.to(dev)
        xg = x.to(dev).requires_grad_()
        if gpu:
            torch.cuda.set_sync_debug_mode("error")  # any host read in the forward/backward raises
        try:
            y = q(xg)
            y.sum().backward()
        finally:
            if gpu:
                torch.cuda.set_sync_debug_mode("default")
        d = (y.detach().cpu() - cpu).abs().max().item()
        assert d < 1e-5, d
        return f"max |diff| {d:.1e}; forward + STE backward on {dev.type} without a device sync"

    @check("calibrators", "calibrators fed device tensors")
    def _():
        x = torch.randn(32, 128, 384, device=dev)
        h, m = HistogramCalibrator(), MaxCalibrator(8, None, False)
        h.collect(x)
        m.collect(x)
        amax = {k: float(h.compute_amax(k)) for k in ("percentile", "entropy", "mse")}
        return f"max {float(m.compute_amax()):.3f}, " + ", ".join(f"{k} {v:.3f}" for k, v in amax.items())

    @check("smoke", f"smoke pipeline, torch on {dev.type} (finetune, calibrate, QAT, eval, ORT engines)")
    def _():
        overrides = ["experiment=smoke", f"device={dev.type}", "tune=none", "qat=default", "qat.max_steps=10", "benchmark.iters=5", *cache]
        if args.random_init:
            overrides.append("model.random_init=true")
        _, ctx = compose_run(overrides, out / "smoke")
        box["ctx"] = ctx
        st = {k: f"{v.seconds:.0f}s" for k, v in ctx.stages.items() if v.status == "done"}
        acc = ctx.metrics.accuracy
        return (
            f"acc fp32 {acc['fp32']:.3f} fake-quant {acc['fake_quant']:.3f} int8 engine {acc['int8']:.3f}; "
            f"parity {ctx.metrics.parity['argmax_agreement']:.3f}; stages {st}",
            {"accuracy": acc, "parity": ctx.metrics.parity},
        )

    def smoke_ctx():
        if "ctx" not in box:
            raise Skip("needs the smoke pipeline run (it failed above or was not selected with --only)")
        return box["ctx"]

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
        return ", ".join(f"{k} {v:.2f} ms" for k, v in res.items()) + " (torch eager; fake quant is a simulation, not a speedup)", res

    @check("ort-cuda", "ONNX Runtime CUDA provider")
    def _():
        import onnxruntime as ort

        avail = ort.get_available_providers()
        if "CUDAExecutionProvider" not in avail:
            why = f"CUDAExecutionProvider not in this onnxruntime build ({ort.__version__}: {', '.join(avail)})"
            unavailable(why + ("; pip install onnxruntime-gpu" if gpu else ""), require_cuda, cuda_flag)
        if not gpu:
            unavailable("onnxruntime-gpu is installed but torch sees no CUDA GPU", require_cuda, cuda_flag)
        from pipeline.engines.onnxruntime import OrtEngine

        ctx = smoke_ctx()
        cfg = engine_config("onnxruntime", None, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        # OrtEngine refuses a session that fell back to the CPU, and profiles one run to see which ops ran on CUDA.
        e = OrtEngine(Path(ctx.run_dir) / "model_int8.onnx", "int8", cfg, out)
        call = e.bind(synthetic(8, 128))
        for _ in range(3):
            call()
        t0 = time.perf_counter()
        for _ in range(20):
            call()
        ms = (time.perf_counter() - t0) * 50
        int8 = "emulated (Q/DQ around float GEMMs: no INT8 kernel ran on CUDA)" if e.emulated else f"INT8 kernels on CUDA {e.kernels}"
        return f"INT8 graph on {e.session.get_providers()[0]}: {int8}; {ms:.2f} ms/batch (IO binding, host clock)", {
            "providers": e.session.get_providers(),
            "emulated": e.emulated,
            "kernels": e.kernels,
            "ms": ms,
        }

    def trt_usable() -> None:
        """Skips (or FAILs under --require-tensorrt) where TensorRT cannot run: no GPU, no / too old TensorRT, old driver."""
        problems = ENGINES["tensorrt"]().check(engine_config("tensorrt"))
        if problems:
            unavailable(" | ".join(problems), args.require_tensorrt, "--require-tensorrt")

    @check("tensorrt", "TensorRT availability (engine=tensorrt validation)")
    def _():
        trt_usable()
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
        return "legal: " + ", ".join(f"{n} ({c['quantized']}/{c['gemms']} GEMMs quantized)" for n, c in gemms.items()), gemms

    def trt_overrides(*extra: str) -> list[str]:
        overrides = ["experiment=smoke", "device=cuda", "engine=tensorrt", "benchmark.iters=5", *cache, *extra]
        if args.random_init:
            overrides.append("model.random_init=true")
        return overrides

    @check("trt-int8", "engine=tensorrt smoke run, INT8: plans built, INT8 plan accuracy vs fake-quant torch")
    def _():
        trt_usable()
        smoke_ctx()  # the training stages come from its cache
        cfg, ctx = compose_run(trt_overrides("qat=default", "qat.max_steps=10"), out / "trt_int8")
        box["trt_cfg"], box["trt_ctx"] = cfg, ctx
        plans = {p: (ctx.run_dir / f"model_{p}.plan").exists() for p in ("fp16", "int8")}
        if not all(plans.values()):
            raise AssertionError(f"plans missing: {plans}")
        acc = ctx.metrics.accuracy
        gap = abs(acc["int8"] - acc["fake_quant"])
        if gap > MAX_ACCURACY_GAP:
            raise AssertionError(
                f"INT8 plan {acc['int8']:.3f} vs fake-quant torch {acc['fake_quant']:.3f}: gap {gap:.3f} > {MAX_ACCURACY_GAP}"
            )
        return (
            f"plans fp16+int8; acc torch fp32 {acc['fp32']:.3f}, fake-quant {acc['fake_quant']:.3f}, "
            f"FP16 plan {acc.get('engine_fp16', float('nan')):.3f}, INT8 plan {acc['int8']:.3f} (gap {gap:.3f}); "
            f"parity vs fake-quant {ctx.metrics.parity.get('argmax_agreement', float('nan')):.3f}",
            {"accuracy": acc, "parity": ctx.metrics.parity, "speedup": ctx.metrics.speedup, "latency_ms": ctx.metrics.latency_ms},
        )

    def trt_ctx():
        if "trt_ctx" not in box:
            trt_usable()
            raise Skip("needs the engine=tensorrt INT8 run (it failed above or was not selected with --only)")
        return box["trt_ctx"]

    @check("trt-layers", "INT8 layers counted from the INT8 plan's engine inspector")
    def _():
        ctx = trt_ctx()
        counts = inspector_counts(ctx.run_dir / "model_int8.inspector.json", "int8")
        if not (counts["layers_int8"] or counts["fused_with_int8_inputs"]):
            raise AssertionError(f"no INT8 tensor in the inspector: the plan runs its GEMMs in float ({counts})")
        return ", ".join(f"{k} {v}" for k, v in counts.items()), counts

    @check("trt-parity", "INT8 plan vs ONNX Runtime CPU on the same model_int8_trt.onnx")
    def _():
        from pipeline.data import batches
        from pipeline.engines.onnxruntime import OrtEngine

        ctx = trt_ctx()
        plan = ctx.engines["int8"]
        ort_cpu = OrtEngine(ctx.run_dir / "model_int8_trt.onnx", "int8", engine_config("onnxruntime"), out)
        a, b = [], []
        for batch in batches(ctx.tokenizer, ctx.encoded["eval"], 32, sort_by_length=True, limit=4):
            feed = {k: v.numpy() for k, v in batch.inputs.items()}
            a.append(plan.run(feed).reshape(len(feed["input_ids"]), -1))
            b.append(np.asarray(ort_cpu.run(feed), dtype=np.float32).reshape(len(feed["input_ids"]), -1))
        x, y = np.concatenate(a), np.concatenate(b)
        agree = float((x.argmax(1) == y.argmax(1)).mean())
        cos = float(np.mean((x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1) + 1e-12)))
        if agree < MIN_AGREEMENT or cos < MIN_COSINE:
            raise AssertionError(
                f"argmax agreement {agree:.3f} (>= {MIN_AGREEMENT}), cosine {cos:.4f} (>= {MIN_COSINE}) on {len(x)} examples"
            )
        return f"argmax agreement {agree:.3f}, cosine {cos:.4f} on {len(x)} eval examples", {"agreement": agree, "cosine": cos, "n": len(x)}

    @check("trt-shapes", "INT8 plan on shapes (1,1) (3,77) (64,128); a shape outside the profile refused clearly")
    def _():
        from pipeline.validation import validate

        ctx = trt_ctx()
        plan, ecfg = ctx.engines["int8"], validate(box["trt_cfg"]).engine
        ran = {}
        for b, s in SHAPES:
            y = plan.run(synthetic(b, s))
            if y.shape[0] != b or not np.isfinite(y).all():
                raise AssertionError(f"shape ({b}, {s}): output {y.shape}, finite {bool(np.isfinite(y).all())}")
            ran[f"{b}x{s}"] = list(y.shape)
        outside = (int(ecfg.max_batch) + 1, min(128, int(ecfg.max_seq)))
        try:
            plan.run(synthetic(*outside))
        except ValueError as exc:
            if "outside the plan's optimization profile" not in str(exc):
                raise
            return f"ran {list(ran)}; {outside} refused: {exc}", {"ran": ran, "refused": str(exc)}
        raise AssertionError(f"shape {outside} is outside the profile (max_batch {ecfg.max_batch}) but ran")

    @check("trt-cache", "INT8 rebuild with a foreign timing cache file (another GPU / TensorRT version)")
    def _():
        import dataclasses

        from pipeline.engines.tensorrt import TrtEngine, timing_cache_path
        from pipeline.validation import validate

        ctx = trt_ctx()
        import tensorrt

        # The run's own engine config, with the timing cache moved to a folder of this check.
        ecfg = dataclasses.replace(validate(box["trt_cfg"]).engine, timing_cache=str(out / "foreign_cache" / "timing.cache"))
        path = timing_cache_path(ecfg, torch.cuda.get_device_name(ecfg.device_id), str(tensorrt.__version__))
        path.parent.mkdir(parents=True, exist_ok=True)
        foreign = b"timing cache of another GPU / TensorRT version"
        path.write_bytes(foreign)
        rebuild = out / "foreign_cache" / "run"
        rebuild.mkdir(parents=True, exist_ok=True)
        e = TrtEngine(ctx.run_dir / "model_int8_trt.onnx", "int8", ecfg, rebuild)
        written = path.read_bytes()
        if not (rebuild / "model_int8.plan").exists() or written == foreign or not written:
            raise AssertionError(f"plan {(rebuild / 'model_int8.plan').exists()}, cache replaced {written != foreign}")
        y = e.run(synthetic(2, 16))
        return f"plan built, cache {path.name} replaced by a fresh one ({len(written)} bytes), plan runs {list(y.shape)}", {
            "cache": str(path),
            "bytes": len(written),
        }

    @check("trt-latency", "INT8 vs FP16 plan latency, CUDA events, batch 1/8/32 x seq 128")
    def _():
        ctx = trt_ctx()
        rows = []
        for b in LATENCY_BATCHES:
            feed = synthetic(b, LATENCY_SEQ)
            p50 = {p: float(np.median(ctx.engines[p].time(feed, warmup=10, iters=50))) for p in ("fp16", "int8")}
            rows.append(
                {"batch": b, "seq": LATENCY_SEQ, **{f"{p}_p50_ms": v for p, v in p50.items()}, "speedup": p50["fp16"] / p50["int8"]}
            )
        detail = "; ".join(
            f"b{r['batch']}: fp16 {r['fp16_p50_ms']:.3f} ms, int8 {r['int8_p50_ms']:.3f} ms ({r['speedup']:.2f}x)" for r in rows
        )
        return detail, rows

    @check("trt-fp8", "engine=tensorrt smoke run, FP8 (compute capability >= 8.9): plans, FP8 layers in the inspector")
    def _():
        trt_usable()
        cc = torch.cuda.get_device_capability(0)
        if cc < (8, 9):
            raise Skip(f"{torch.cuda.get_device_name(0)} has compute capability {cc[0]}.{cc[1]} < 8.9: no FP8 kernels")
        smoke_ctx()
        _, ctx = compose_run(trt_overrides("quant.format=fp8", "calibration=max", "qat=none"), out / "trt_fp8")
        plans = {p: (ctx.run_dir / f"model_{p}.plan").exists() for p in ("fp16", "fp8")}
        if not all(plans.values()):
            raise AssertionError(f"plans missing: {plans}")
        counts = inspector_counts(ctx.run_dir / "model_fp8.inspector.json", "fp8")
        if not (counts["layers_fp8"] or counts["fused_with_fp8_inputs"]):
            raise AssertionError(f"no FP8 tensor in the inspector: the plan runs its GEMMs in higher precision ({counts})")
        acc = ctx.metrics.accuracy
        gap = abs(acc["fp8"] - acc["fake_quant"]) if "fp8" in acc else float("nan")
        if not gap <= MAX_ACCURACY_GAP:
            raise AssertionError(f"FP8 plan vs fake-quant torch: {acc}")
        return f"plans fp16+fp8; FP8 plan acc {acc['fp8']:.3f} vs fake-quant {acc['fake_quant']:.3f}; {counts}", {
            "accuracy": acc,
            "inspector": counts,
        }

    @check("ort-trt", "ONNX Runtime TensorRT provider on model_int8_trt.onnx (engine profile, caches)")
    def _():
        import onnxruntime as ort

        if "TensorrtExecutionProvider" not in ort.get_available_providers() or not gpu:
            raise Skip(
                f"TensorrtExecutionProvider not usable in onnxruntime {ort.__version__} here ({', '.join(ort.get_available_providers())})"
            )
        from pipeline.engines.onnxruntime import OrtEngine, trt_provider_problems

        problems = trt_provider_problems(ort.__version__, box.get("probe", {}).get("tensorrt"))
        if problems:
            raise Skip(problems[0])
        ctx = smoke_ctx()
        cfg = engine_config("onnxruntime", None, providers=["TensorrtExecutionProvider", "CUDAExecutionProvider"])
        try:
            e = OrtEngine(ctx.run_dir / "model_int8_trt.onnx", "int8", cfg, out)
        except RuntimeError as exc:
            if "did not start TensorrtExecutionProvider" in str(exc):
                raise Skip(f"{exc} (onnxruntime-gpu loads the TensorRT it was built against; 1.27+ for TensorRT 11)") from exc
            raise
        y = e.run(synthetic(8, 128))
        return f"runs on {e.session.get_providers()[0]}, logits {list(y.shape)}", {"providers": e.session.get_providers()}

    @check("time", f"whole check within {args.time_budget:.0f} s")
    def _():
        spent = time.perf_counter() - t_start
        if not gpu:
            raise Skip(f"no GPU: the budget is for a GPU run ({spent:.0f} s here)")
        if spent > args.time_budget:
            raise AssertionError(f"{spent:.0f} s > {args.time_budget:.0f} s")
        return f"{spent:.0f} s", {"seconds": spent}

    seconds = time.perf_counter() - t_start
    record = {
        "started": started,
        "seconds": round(seconds, 1),
        "where": where,
        "argv": sys.argv[1:],
        "probe": box.get("probe"),
        "rows": RECORDS,
        "summary": summary(ROWS),
        "exit": 1 if any(r[1] == "FAIL" for r in ROWS) else 0,
    }
    (out / "gpu_check.json").write_text(json.dumps(record, indent=2, default=str))
    print(f"\nrecord: {out / 'gpu_check.json'} ({seconds:.0f} s)", flush=True)
    w = max([len(r[0]) for r in ROWS] + [5])
    print(f"\n{where}\n")
    print(f"| {'check':{w}} | result  | detail |\n|{'-' * (w + 2)}|---------|--------|")
    for name, status, detail in ROWS:
        print(f"| {name:{w}} | {status:7} | {detail} |")
    print(summary(ROWS), flush=True)
    return record["exit"]


if __name__ == "__main__":
    sys.exit(main())
