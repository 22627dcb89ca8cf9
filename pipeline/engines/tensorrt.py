"""TensorRT engine (engine=tensorrt), written for TensorRT 11.x; 10.x from 10.12 works where the same calls exist.

Strongly typed only. TensorRT 11 removed weak typing (migration guide 10.x -> 11.x, "Strongly Typed Networks Are
Now Required"): no precision builder flags, no INT8 calibrator; every tensor's type comes from the graph. So the
precision of a plan is the precision of the ONNX graph it is built from:

    fp16  model_fp16.onnx      FP32 -> FP16 converted graph (LayerNorm / softmax / reductions kept FP32)
    int8  model_int8_trt.onnx  signed INT8 Q/DQ on every quantized GEMM input, FP16 elsewhere
    fp8   model_fp8.onnx       FLOAT8E4M3FN Q/DQ (compute capability 8.9 or later: Ada, Hopper and later)

Every graph is checked statically first (pipeline.engines.trt_rules): a graph TensorRT would refuse, or would run
in a precision other than the one asked for, stops here with the rule and node named, before TensorRT is imported.
Build (on engine.device_id, made current first): optimization profile (min/opt/max batch and sequence, from
config), workspace limit, builder optimization level, detailed profiling verbosity so the engine inspector states
each layer's tensor types, and a timing cache file keyed by GPU name and TensorRT version; a cache TensorRT refuses
(another GPU or version: set_timing_cache returns False) is replaced by a fresh one. The inspector reads a context
whose input shapes are set (the profile's opt), without which TensorRT prints no format information. Inference:
torch CUDA tensors as I/O (no pycuda), execute_async_v3 on the engine's own CUDA stream, dynamic shapes per call
checked against the profile; `time()` measures back-to-back enqueues with CUDA events.

TensorRT is imported lazily: where it or a GPU is missing, `check()` reports it at validation, before any stage
runs. Not executed on these CPU machines: see docs/results/verification.md and scripts/gpu_check.sh.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx

from pipeline.engines.trt_rules import check_tensorrt, graph_precision, has_quantized_gemm
from pipeline.outputs import atomic_write, write_json
from pipeline.schema import OnnxRuntimeEngineConfig, TensorRTEngineConfig

log = logging.getLogger(__name__)

TARGET = "TensorRT 11.x (10.x accepted)"
MIN_MAJOR = 10
# On 10.x: 10.12 or later. Weak typing was deprecated in 10.12 ("APIs related to weak typing have been deprecated.
# TensorRT will be using strong-typing exclusively in the future": TensorRT 10.12.0 release notes); the strongly
# typed Q/DQ path this engine relies on is NVIDIA's guidance from that release on.
MIN_10X = (10, 12)
PRECISIONS = ("fp16", "int8", "fp8")
INSTALL_HINT = "pip install tensorrt on a machine with an NVIDIA GPU"
# FP8 (E4M3) kernels: compute capability 8.9 (Ada) and 9.0+ (Hopper and later), TensorRT support matrix.
FP8_MIN_CAPABILITY = (8, 9)
# TensorRT 11's CUDA 13 wheels (pip `tensorrt` / `tensorrt-cu13`) need driver r580 or later ("r580+ on Linux and
# Windows for the CUDA 13.x packages ... r535+ ... applies only to CUDA 12.x pip wheels": TensorRT 11.4.0,
# Installing > Prerequisites).
MIN_DRIVER = {13: 580, 12: 535}


def check(cfg: TensorRTEngineConfig) -> list[str]:
    """Problems that stop engine=tensorrt before any stage runs (missing or too old TensorRT, no GPU, old driver).

    Args:
        cfg: the engine config (unused today; the registry's check signature).

    Returns:
        One message per problem; empty when TensorRT 11.x (or 10.x from 10.12), a CUDA GPU and a driver new
        enough for TensorRT's CUDA build are present.
    """
    problems = []
    trt_version = None
    try:
        import tensorrt as trt

        trt_version = str(trt.__version__)
        if _major(trt) < MIN_MAJOR:
            problems.append(f"engine=tensorrt: TensorRT {trt.__version__} found; this engine targets {TARGET}; {INSTALL_HINT}")
        elif _major(trt) == 10 and version_tuple(trt_version)[:2] < MIN_10X:
            problems.append(
                f"engine=tensorrt: TensorRT {trt.__version__} found; on 10.x this engine needs 10.12 or later (weak typing "
                f"deprecated, strongly typed Q/DQ networks are NVIDIA's guidance from 10.12); install TensorRT 11.x or "
                f"'tensorrt-cu12>=10.12,<11'"
            )
    except ImportError:
        problems.append(f"engine=tensorrt: the tensorrt Python package is not installed; this engine targets {TARGET}; {INSTALL_HINT}")
    import torch

    if not torch.cuda.is_available():
        problems.append(
            "engine=tensorrt: no CUDA GPU visible to torch; TensorRT engines build and run on NVIDIA GPUs only (use engine=onnxruntime here)"
        )
    elif trt_version is not None:
        problems += driver_problems(trt_version, tensorrt_cuda_major(), driver_version())
    return problems


def version_tuple(version: str) -> tuple[int, ...]:
    """'11.1.0.106' -> (11, 1, 0, 106); non-numeric parts end it ('1.27.0.dev1' -> (1, 27, 0))."""
    out = []
    for part in str(version).split("."):
        m = re.match(r"\d+", part)
        if not m:
            break
        out.append(int(m.group()))
        if m.group() != part:
            break
    return tuple(out)


def driver_problems(trt_version: str, cuda_major: int | None, driver: str | None) -> list[str]:
    """The driver check for TensorRT's CUDA build: empty when unknown (no metadata, no nvidia-smi) or new enough."""
    if cuda_major not in MIN_DRIVER or not driver:
        return []
    need = MIN_DRIVER[cuda_major]
    have = version_tuple(driver)
    if have and have[0] < need:
        return [
            f"engine=tensorrt: TensorRT {trt_version} is the CUDA {cuda_major} build, which needs NVIDIA driver r{need} or later; "
            f"this machine has {driver}: update the driver or install the CUDA 12 build (tensorrt-cu12)"
        ]
    return []


def tensorrt_cuda_major() -> int | None:
    """CUDA major of the installed TensorRT wheels, from their distribution names (tensorrt-cu13-libs, tensorrt_cu12...)."""
    majors = set()
    for dist in metadata.distributions():
        m = re.fullmatch(r"tensorrt[-_]cu(\d+)(?:[-_].*)?", str(dist.metadata.get("Name", "")).lower())
        if m:
            majors.add(int(m.group(1)))
    return majors.pop() if len(majors) == 1 else None


def driver_version() -> str | None:
    """The NVIDIA driver version from nvidia-smi ('580.65.06'), or None where nvidia-smi is absent or fails."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=20, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    return lines[0] if lines else None


def _major(trt: ModuleType) -> int:
    return int(str(trt.__version__).split(".")[0])


def network_flags(trt: ModuleType) -> int:
    """`create_network` flags for a strongly typed network on the installed TensorRT.

    TensorRT 10.x: strong typing is opt-in through NetworkDefinitionCreationFlag.STRONGLY_TYPED. TensorRT 11.x:
    networks are always strongly typed and that flag is "deprecated ... retained for API compatibility but is
    ignored" (Python API, Builder > NetworkDefinitionCreationFlag, 11.0), so nothing is passed.
    """
    if _major(trt) >= 11:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def profile_shapes(
    cfg: TensorRTEngineConfig | OnnxRuntimeEngineConfig, input_names: list[str]
) -> dict[str, tuple[tuple[int, int], tuple[int, int], tuple[int, int]]]:
    """(min, opt, max) shape of every (batch, sequence) input for the optimization profile."""
    lo, opt, hi = (cfg.min_batch, cfg.min_seq), (cfg.opt_batch, cfg.opt_seq), (cfg.max_batch, cfg.max_seq)
    return {name: (lo, opt, hi) for name in input_names}


def check_graph(onnx_path: Path, precision: str) -> None:
    """Refuses a graph TensorRT would reject or run in another precision than `precision` (no TensorRT needed).

    Args:
        onnx_path: the TensorRT graph (model_fp16.onnx, model_int8_trt.onnx or model_fp8.onnx).
        precision: "fp16", "int8" or "fp8".

    Raises:
        ValueError: unknown precision, or the graph's precision is not `precision`.
        RuntimeError: the graph breaks a TensorRT rule (each violation on its own line).
    """
    if precision not in PRECISIONS:
        raise ValueError(
            f"TensorRT precision {precision!r}: one of {', '.join(PRECISIONS)} (a strongly typed plan has its graph's precision)"
        )
    model = onnx.load(str(onnx_path))
    # gemm-inputs (a half-quantized GEMM) builds and runs, in float: worth a warning, not a refusal.
    violations = check_tensorrt(model)
    for v in violations:
        if v.rule == "gemm-inputs":
            log.warning("tensorrt: %s", v.line(onnx_path))
    fatal = [v.line(onnx_path) for v in violations if v.rule != "gemm-inputs"]
    if fatal:
        raise RuntimeError(f"{onnx_path} is not a legal TensorRT graph ({len(fatal)} violations):\n" + "\n".join(fatal))
    found = graph_precision(model)
    if found != precision:
        raise ValueError(
            f"{onnx_path} is a {found} graph, not {precision}: a strongly typed plan takes its precision from the graph; "
            f"build the {precision} plan from the {precision} graph"
        )
    if precision != "fp16" and not has_quantized_gemm(model):
        raise ValueError(f"{onnx_path}: no GEMM has both inputs quantized, so a {precision} plan would run every GEMM in float")


def parse_inspector(info: str | dict) -> dict:
    """Per-layer precision from the engine inspector's JSON (ProfilingVerbosity.DETAILED), 10.x or 11.x layout.

    10.x: {"Layers": [{"Name", "LayerType", "Inputs": [{"Name", "Format/Datatype": "Row major linear Int8 format"}],
    "Outputs": [...]}], "Bindings": ["input_ids", ...]}. 11.x ("Migrating IEngineInspector Usage from TensorRT
    10.x to 11.x"): "Bindings" is replaced by "I/O Tensors" ([{"Name", "IOMode", "DataType", "Dimensions", ...}]),
    and a tensor's format and data type are separate fields ("Format", "DataType").

    A layer's precision is what the inspector states: the one data type its inputs are stated to have (a GEMM
    whose operands are Int8 runs an INT8 kernel), "mixed" when they differ, "none" without inputs. A fused
    Myelin / ForeignNode layer is "unknown": the inspector states only its boundary tensors, not the precision
    of the GEMMs fused inside, and it is not guessed. With LAYER_NAMES_ONLY verbosity layers are plain strings:
    "unknown" too.

    Returns:
        {"layout": "10.x" | "11.x" | "unknown", "io_tensors": [{"name", "mode", "dtype"}], "layers": [...],
        "by_precision": {precision: layers}, "gemm_layers": n, "gemm_by_precision": {precision: n},
        "gemm_int8": n, "gemm_fp8": n, "gemm_unknown": n}
    """
    data = json.loads(info) if isinstance(info, str) else info
    if "I/O Tensors" in data:
        layout = "11.x"
        io = [{"name": t.get("Name", "?"), "mode": t.get("IOMode", "?"), "dtype": _dtype(t)} for t in data["I/O Tensors"]]
    elif "Bindings" in data:
        layout = "10.x"
        io = [{"name": name, "mode": "?", "dtype": "unknown"} for name in data["Bindings"]]
    else:
        layout, io = "unknown", []
    rows = []
    for layer in data.get("Layers", []):
        if isinstance(layer, str):
            rows.append({"name": layer, "type": "unknown", "fused": _fused(layer, ""), "precision": "unknown", "inputs": []})
            continue
        name, kind = layer.get("Name", "?"), layer.get("LayerType", "?")
        dtypes = [_dtype(t) for t in layer.get("Inputs", [])]
        fused = _fused(name, kind)
        if fused:
            precision = "unknown"
        elif not dtypes:
            precision = "none"
        else:
            precision = dtypes[0] if len(set(dtypes)) == 1 else "mixed"
        rows.append({"name": name, "type": kind, "fused": fused, "precision": precision, "inputs": dtypes})
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["precision"]] = counts.get(r["precision"], 0) + 1
    gemms = [r for r in rows if r["fused"] or any(g in r["type"].lower() for g in _GEMM_LAYER_TYPES)]
    by_gemm: dict[str, int] = {}
    for r in gemms:
        by_gemm[r["precision"]] = by_gemm.get(r["precision"], 0) + 1
    return {
        "layout": layout,
        "io_tensors": io,
        "layers": rows,
        "by_precision": counts,
        "gemm_layers": len(gemms),
        "gemm_by_precision": by_gemm,
        "gemm_int8": by_gemm.get("int8", 0),
        "gemm_fp8": by_gemm.get("fp8", 0),
        "gemm_unknown": by_gemm.get("unknown", 0),
    }


# Layer types that run GEMMs (10.x names such as CaskGemmMatrixMultiply, CaskConvolution, gemm); fused Myelin /
# ForeignNode layers count as GEMM layers too (they hold the attention GEMMs) but with an unknown precision.
_GEMM_LAYER_TYPES = ("gemm", "matrixmultiply", "convolution")

# 11.x "DataType" values (tensorrt.DataType names as the inspector prints them, e.g. "Float" in the migration
# guide's I/O Tensors example) and the type words inside 10.x "Format/Datatype" strings.
_DTYPES = {
    "float": "fp32",
    "float32": "fp32",
    "fp32": "fp32",
    "half": "fp16",
    "float16": "fp16",
    "fp16": "fp16",
    "bf16": "bf16",
    "bfloat16": "bf16",
    "int8": "int8",
    "fp8": "fp8",
    "float8": "fp8",
    "e4m3": "fp8",
    "int4": "int4",
    "fp4": "fp4",
    "int32": "int32",
    "int64": "int64",
    "bool": "bool",
    "uint8": "uint8",
}


def _dtype(tensor: dict) -> str:
    """A tensor's stated data type: 11.x "DataType" field, else parsed from 10.x "Format/Datatype"."""
    if "DataType" in tensor:
        return _DTYPES.get(str(tensor["DataType"]).strip().lower(), "other")
    words = str(tensor.get("Format/Datatype", "")).lower().replace("(", " ").replace(")", " ").split()
    # 10.x strings read "Row major linear Int8 format", "Channel major FP16 format where channel % 2 == 0", ...
    for w in words:
        if w in _DTYPES:
            return _DTYPES[w]
    return "unknown"


def _fused(name: str, kind: str) -> bool:
    return kind.lower() == "myelin" or "foreignnode" in name.lower()


def require_fp8(capability: tuple[int, int], gpu: str = "this GPU") -> None:
    """Refuses an FP8 build on a GPU without FP8 kernels (compute capability below 8.9), before TensorRT builds.

    Raises:
        RuntimeError: naming the GPU, its capability and what FP8 needs.
    """
    if tuple(capability) < FP8_MIN_CAPABILITY:
        cc = ".".join(map(str, capability))
        need = ".".join(map(str, FP8_MIN_CAPABILITY))
        raise RuntimeError(
            f"FP8 plan on {gpu} (compute capability {cc}): TensorRT's FP8 kernels need compute capability {need} or later "
            f"(Ada, Hopper and later); build quant.format=int8 here"
        )


def timing_cache_path(cfg: TensorRTEngineConfig, gpu_name: str, trt_version: str) -> Path | None:
    """The timing cache file for this GPU and TensorRT version, next to engine.timing_cache; None when caching is off.

    A timing cache holds kernel timings of one GPU model under one TensorRT version; TensorRT refuses a cache from
    another (set_timing_cache returns False). Keying the file by both lets H100 and H200 runs, or two TensorRT
    versions, share a cache folder without evicting each other's caches.

        outputs/.cache/tensorrt/timing.cache -> outputs/.cache/tensorrt/timing.nvidia-h100-80gb-hbm3.trt11.1.0.106.cache
    """
    if not cfg.timing_cache:
        return None
    base = Path(cfg.timing_cache).expanduser()
    gpu = re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-") or "gpu"
    trt = re.sub(r"[^A-Za-z0-9.]+", "-", trt_version).strip("-")
    return base.with_name(f"{base.stem}.{gpu}.trt{trt}{base.suffix}")


def attach_timing_cache(config: object, cache_path: Path | None) -> object | None:
    """Attaches the timing cache stored at `cache_path` to the builder config, or a fresh one when TensorRT refuses it.

    `IBuilderConfig.set_timing_cache(cache, ignore_mismatch=False)` returns False for a cache whose device properties
    (another GPU) or version do not match; TensorRT then has no cache attached. `create_timing_cache(b"")` creates a
    new, empty cache (Python API, IBuilderConfig).

    Returns:
        The attached ITimingCache (to serialize after the build), or None when caching is off or no cache attaches.
    """
    if cache_path is None:
        return None
    data = cache_path.read_bytes() if cache_path.exists() else b""
    if data:
        try:
            cache = config.create_timing_cache(data)
        except Exception:  # bytes TensorRT cannot even read as a cache: refused like a mismatch
            cache = None
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            return cache
        log.warning(
            "tensorrt: timing cache %s was refused (made on another GPU or TensorRT version); building with a fresh cache that replaces it",
            cache_path,
        )
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("tensorrt: TensorRT attached no timing cache, not even a fresh one; building without a timing cache")
        return None
    return cache


def save_timing_cache(config: object, attached: object | None, cache_path: Path | None) -> None:
    """Writes the timing cache the build used (and extended) to `cache_path`, atomically; nothing when none is attached."""
    if cache_path is None or attached is None:
        return
    cache = config.get_timing_cache() or attached
    data = bytes(cache.serialize())
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(cache_path, lambda p: p.write_bytes(data))


def build_plan(trt: ModuleType, logger: object, onnx_path: Path, cfg: TensorRTEngineConfig, cache_path: Path | None) -> bytes:
    """Parses the ONNX graph into a strongly typed network and builds the serialized plan.

    Args:
        trt: the tensorrt module.
        logger: a tensorrt.Logger.
        onnx_path: the TensorRT graph (already checked by `check_graph`).
        cfg: workspace, optimization level and the optimization profile.
        cache_path: the timing cache file (`timing_cache_path`), or None.

    Returns:
        The serialized plan.

    Raises:
        RuntimeError: the parser or the builder failed (the parser's errors in the message).
    """
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    input_names = [network.get_input(i).name for i in range(network.num_inputs)]
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(cfg.workspace_gb * (1 << 30)))
    config.builder_optimization_level = cfg.optimization_level
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    # No precision flags: in a strongly typed network the ONNX types (FP16 tensors, INT8/FP8 Q/DQ) are the precision.
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile_shapes(cfg, input_names).items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache = attach_timing_cache(config, cache_path)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    save_timing_cache(config, cache, cache_path)
    return bytes(plan)


def inspect_engine(trt: ModuleType, engine: object, context: object, input_names: list[str]) -> dict:
    """The engine inspector's JSON for `context`, with every input shape set to the profile's opt shape first.

    "Setting the execution context and specifying all the input shapes allows the inspector to calculate concrete
    dimensions for any dynamic shapes and display their format information. Otherwise, values dependent on input
    shapes will be displayed as -1 and format information will not be shown" (NvInferRuntime.h,
    IEngineInspector::setExecutionContext): without the shapes every layer's precision would read "unknown".

    Raises:
        RuntimeError: TensorRT refused an opt shape, or still reports inputs without shapes (infer_shapes).
    """
    for name in input_names:
        opt = tuple(int(d) for d in engine.get_tensor_profile_shape(name, 0)[1])
        if not context.set_input_shape(name, opt):
            raise RuntimeError(f"TensorRT refused the profile's opt shape {opt} for input {name}")
    missing = list(context.infer_shapes())
    if missing:
        raise RuntimeError(f"inputs without a shape before inspecting the engine: {missing}")
    inspector = engine.create_engine_inspector()
    inspector.execution_context = context
    return json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))


def check_in_profile(name: str, shape: tuple[int, ...], profile: tuple[tuple[int, ...], ...]) -> None:
    """Refuses an input shape outside the plan's optimization profile (min, opt, max), naming the allowed range.

    Raises:
        ValueError: e.g. "input input_ids shape (65, 128) is outside the plan's optimization profile: min (1, 1),
        max (64, 512) ...".
    """
    lo, _, hi = profile
    if len(shape) != len(lo) or any(s < a or s > b for s, a, b in zip(shape, lo, hi, strict=True)):
        raise ValueError(
            f"input {name} shape {shape} is outside the plan's optimization profile: min {tuple(lo)}, max {tuple(hi)} "
            f"(engine.min_batch/max_batch, engine.min_seq/max_seq); rebuild with a wider profile or split the batch"
        )


class TrtEngine:
    """A serialized, deserialized TensorRT plan with its execution context (strongly typed).

    Every enqueue goes to the engine's own CUDA stream (`self.stream`), never to the legacy default stream
    (handle 0), on which TensorRT adds device synchronizations ("Using default stream may lead to performance
    issues due to additional cudaDeviceSynchronize() calls": Python API, IExecutionContext.execute_async_v3).
    """

    def __init__(self, onnx_path: Path, precision: str, cfg: TensorRTEngineConfig, run_dir: Path):
        check_graph(onnx_path, precision)
        import tensorrt as trt
        import torch

        self.precision = precision
        self.emulated = False  # real INT8 / FP8 / FP16 kernels: timed like any engine
        self._torch = torch
        self.device = torch.device("cuda", cfg.device_id)
        # The builder tunes kernels for, and the runtime loads the plan on, the *current* CUDA device: make
        # engine.device_id current before anything of TensorRT's is created.
        torch.cuda.set_device(self.device)
        gpu = torch.cuda.get_device_name(self.device)
        if precision == "fp8":
            require_fp8(tuple(torch.cuda.get_device_capability(self.device)), gpu)
        logger = trt.Logger(trt.Logger.WARNING)
        cache_path = timing_cache_path(cfg, gpu, str(trt.__version__))
        plan = build_plan(trt, logger, onnx_path, cfg, cache_path)
        plan_path = atomic_write(run_dir / f"model_{precision}.plan", lambda p: p.write_bytes(plan))
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialize the plan it built from {onnx_path} (see the TensorRT log above)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        # (min, opt, max) of every input in the plan's only optimization profile (index 0).
        self.profile = {n: tuple(tuple(int(d) for d in s) for s in self.engine.get_tensor_profile_shape(n, 0)) for n in self.input_names}
        info = inspect_engine(trt, self.engine, self.context, self.input_names)
        inspect_path = write_json(run_dir / f"model_{precision}.inspector.json", info)
        summary = parse_inspector(info)
        write_json(run_dir / f"model_{precision}.layers.json", summary)
        self.files = {"plan": plan_path, "inspector": inspect_path}
        if cache_path:
            self.files["timing_cache"] = cache_path
        # gemm_int8 / gemm_fp8 / gemm_unknown always present (0 included) so reports can read them unconditionally.
        self.kernels = (
            {f"layers_{k}": v for k, v in summary["by_precision"].items()}
            | {f"gemm_{k}": v for k, v in summary["gemm_by_precision"].items()}
            | {k: summary[k] for k in ("gemm_layers", "gemm_int8", "gemm_fp8", "gemm_unknown")}
        )
        out_dtype = self.engine.get_tensor_dtype(self.output_name)
        dtypes = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16}
        if out_dtype not in dtypes:
            raise RuntimeError(f"{onnx_path}: output {self.output_name} is {out_dtype}; the graph must end in float32/float16 logits")
        self._out_dtype = dtypes[out_dtype]
        # The engine's own stream: inputs are copied, outputs allocated and the plan enqueued on it.
        self.stream = torch.cuda.Stream(device=self.device)

    @contextmanager
    def _on_stream(self) -> Iterator[None]:
        """The engine's device current and its stream the current stream (copies, allocations, enqueues)."""
        torch = self._torch
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            yield

    def _on_device(self, inputs: dict[str, np.ndarray]) -> dict:
        """int64 (batch, seq) arrays -> device tensors for the engine's inputs (call inside `_on_stream`)."""
        torch = self._torch
        return {
            k: torch.from_numpy(np.ascontiguousarray(v)).to(self.device, torch.int64) for k, v in inputs.items() if k in self.input_names
        }

    def _bind(self, dev: dict, out=None):
        """Sets every input's shape and address and the output's address; allocates the output when not given.

        Raises:
            ValueError: a shape outside the plan's optimization profile (named, with the profile's range).
            RuntimeError: TensorRT refused a shape or an address (set_input_shape / set_tensor_address returned False).
        """
        for name in self.input_names:
            t = dev[name]
            shape = tuple(int(d) for d in t.shape)
            check_in_profile(name, shape, self.profile[name])
            if not self.context.set_input_shape(name, shape):
                raise RuntimeError(f"TensorRT refused input {name} of shape {shape} (set_input_shape returned False; see the TensorRT log)")
            if not self.context.set_tensor_address(name, t.data_ptr()):
                raise RuntimeError(f"TensorRT refused the address of input {name}")
        if out is None:
            shape = tuple(int(d) for d in self.context.get_tensor_shape(self.output_name))
            out = self._torch.empty(shape, dtype=self._out_dtype, device=self.device)
        if not self.context.set_tensor_address(self.output_name, out.data_ptr()):
            raise RuntimeError(f"TensorRT refused the address of output {self.output_name}")
        return out

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """(batch, seq) int64 arrays by input name -> logits (batch, num_labels) float32 on the host."""
        with self._on_stream():
            dev = self._on_device(inputs)  # referenced until the stream is synchronized: TensorRT reads them
            out = self._bind(dev)
            self._enqueue()
            self.stream.synchronize()
            return out.float().cpu().numpy()

    def bind(self, inputs: dict[str, np.ndarray]):
        """Inputs and output placed on the GPU once; the call re-binds them (other bound calls share the context),
        enqueues on the engine's stream and waits for it. For host-clock timing; `time` is the precise one."""
        with self._on_stream():
            dev = self._on_device(inputs)
            out = self._bind(dev)
        self.stream.synchronize()

        def call() -> None:
            with self._on_stream():
                self._bind(dev, out)
                self._enqueue()
            self.stream.synchronize()

        return call

    def time(self, inputs: dict[str, np.ndarray], warmup: int, iters: int) -> list[float]:
        """Milliseconds of each of `iters` back-to-back enqueues, measured with CUDA events on the engine's stream.

        Inputs, output, shapes and addresses are bound once; `warmup` enqueues run first; then each timed
        enqueue sits between a start and an end event recorded on the same stream, with no host synchronization
        in between, and the stream is synchronized once at the end. The result has no host binding work and no
        per-call synchronization in it (both bias small shapes when timed with a host clock).
        """
        torch = self._torch
        with self._on_stream():
            dev = self._on_device(inputs)  # inputs and output stay referenced until the final synchronize
            out = self._bind(dev)
            for _ in range(warmup):
                self._enqueue()
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
            for start, end in events:
                start.record(self.stream)
                self._enqueue()
                end.record(self.stream)
        self.stream.synchronize()
        del dev, out
        return [float(start.elapsed_time(end)) for start, end in events]


def build(onnx_path: Path, precision: str, cfg: TensorRTEngineConfig, run_dir: Path) -> TrtEngine:
    """Builds (and loads) the `precision` plan from its TensorRT graph.

    Args:
        onnx_path: model_fp16.onnx for "fp16", model_int8_trt.onnx for "int8", model_fp8.onnx for "fp8".
        precision: "fp16", "int8" or "fp8"; must be the graph's own precision (strong typing).
        cfg: engine config (device, workspace, optimization level, timing cache, profile).
        run_dir: where model_{precision}.plan, .inspector.json and .layers.json are written.

    Returns:
        The engine, ready to run.
    """
    return TrtEngine(onnx_path, precision, cfg, run_dir)
