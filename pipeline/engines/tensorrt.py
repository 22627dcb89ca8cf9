"""TensorRT engine (engine=tensorrt), written for TensorRT 11.x; 10.x works where the same calls exist.

Strongly typed only. TensorRT 11 removed weak typing (migration guide 10.x -> 11.x, "Strongly Typed Networks Are
Now Required"): no precision builder flags, no INT8 calibrator; every tensor's type comes from the graph. So the
precision of a plan is the precision of the ONNX graph it is built from:

    fp16  model_fp16.onnx      FP32 -> FP16 converted graph (LayerNorm / softmax / reductions kept FP32)
    int8  model_int8_trt.onnx  signed INT8 Q/DQ on every quantized GEMM input, FP16 elsewhere
    fp8   model_fp8.onnx       FLOAT8E4M3FN Q/DQ (Hopper and later)

Every graph is checked statically first (pipeline.engines.trt_rules): a graph TensorRT would refuse, or would run
in a precision other than the one asked for, stops here with the rule and node named, before TensorRT is imported.
Build: optimization profile (min/opt/max batch and sequence, from config), workspace limit, builder optimization
level, a timing cache file reused across runs, detailed profiling verbosity so the engine inspector states each
layer's tensor types. Inference: torch CUDA tensors as I/O (no pycuda), execute_async_v3 on the current torch
stream, dynamic shapes per call.

TensorRT is imported lazily: where it or a GPU is missing, `check()` reports it at validation, before any stage
runs. Not executed on these CPU machines: see README "Where each feature was verified".
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx

from pipeline.engines.trt_rules import check_tensorrt, graph_precision, has_quantized_gemm
from pipeline.outputs import atomic_write, write_json
from pipeline.schema import EngineConfig

log = logging.getLogger(__name__)

TARGET = "TensorRT 11.x (10.x accepted)"
MIN_MAJOR = 10
PRECISIONS = ("fp16", "int8", "fp8")
INSTALL_HINT = "pip install tensorrt on a machine with an NVIDIA GPU"


def check(cfg: EngineConfig) -> list[str]:
    """Problems that stop engine=tensorrt before any stage runs (missing or too old TensorRT, no GPU).

    Args:
        cfg: the engine config (unused today; the registry's check signature).

    Returns:
        One message per problem; empty when TensorRT >= 10 and a CUDA GPU are present.
    """
    problems = []
    try:
        import tensorrt as trt

        if _major(trt) < MIN_MAJOR:
            problems.append(f"engine=tensorrt: TensorRT {trt.__version__} found; this engine targets {TARGET}; {INSTALL_HINT}")
    except ImportError:
        problems.append(f"engine=tensorrt: the tensorrt Python package is not installed; this engine targets {TARGET}; {INSTALL_HINT}")
    import torch

    if not torch.cuda.is_available():
        problems.append(
            "engine=tensorrt: no CUDA GPU visible to torch; TensorRT engines build and run on NVIDIA GPUs only (use engine=onnxruntime here)"
        )
    return problems


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


def profile_shapes(cfg: EngineConfig, input_names: list[str]) -> dict[str, tuple[tuple[int, int], tuple[int, int], tuple[int, int]]]:
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


class TrtEngine:
    """A serialized, deserialized TensorRT plan with its execution context (strongly typed)."""

    def __init__(self, onnx_path: Path, precision: str, cfg: EngineConfig, run_dir: Path):
        check_graph(onnx_path, precision)
        import tensorrt as trt
        import torch

        self.precision = precision
        self.emulated = False  # real INT8 / FP8 / FP16 kernels: timed like any engine
        self._torch = torch
        self.device = torch.device("cuda", cfg.device_id)
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(network_flags(trt))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
        self.input_names = [network.get_input(i).name for i in range(network.num_inputs)]
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(cfg.workspace_gb * (1 << 30)))
        config.builder_optimization_level = cfg.optimization_level
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
        # No precision flags: in a strongly typed network the ONNX types (FP16 tensors, INT8/FP8 Q/DQ) are the precision.
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile_shapes(cfg, self.input_names).items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
        cache_path = Path(cfg.timing_cache).expanduser() if cfg.timing_cache else None
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path and cache_path.exists() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
        if cache_path:
            data = bytes(config.get_timing_cache().serialize())
            atomic_write(cache_path, lambda p: p.write_bytes(data))
        plan_path = atomic_write(run_dir / f"model_{precision}.plan", lambda p: p.write_bytes(bytes(plan)))
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(bytes(plan))
        self.context = self.engine.create_execution_context()
        inspector = self.engine.create_engine_inspector()
        inspector.execution_context = self.context
        info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
        inspect_path = write_json(run_dir / f"model_{precision}.inspector.json", info)
        summary = parse_inspector(info)
        write_json(run_dir / f"model_{precision}.layers.json", summary)
        self.files = {"plan": plan_path, "inspector": inspect_path}
        # gemm_int8 / gemm_fp8 / gemm_unknown always present (0 included) so reports can read them unconditionally.
        self.kernels = (
            {f"layers_{k}": v for k, v in summary["by_precision"].items()}
            | {f"gemm_{k}": v for k, v in summary["gemm_by_precision"].items()}
            | {k: summary[k] for k in ("gemm_layers", "gemm_int8", "gemm_fp8", "gemm_unknown")}
        )
        self.output_name = next(
            self.engine.get_tensor_name(i)
            for i in range(self.engine.num_io_tensors)
            if self.engine.get_tensor_mode(self.engine.get_tensor_name(i)) == trt.TensorIOMode.OUTPUT
        )
        out_dtype = self.engine.get_tensor_dtype(self.output_name)
        dtypes = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16}
        if out_dtype not in dtypes:
            raise RuntimeError(f"{onnx_path}: output {self.output_name} is {out_dtype}; the graph must end in float32/float16 logits")
        self._out_dtype = dtypes[out_dtype]

    def run_torch(self, inputs: dict) -> object:
        """Device tensors in (batch, seq) -> logits on the device; asynchronous on the current stream."""
        torch = self._torch
        for name in self.input_names:
            t = inputs[name].contiguous()
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        out = torch.empty(tuple(self.context.get_tensor_shape(self.output_name)), dtype=self._out_dtype, device=self.device)
        self.context.set_tensor_address(self.output_name, out.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        return out

    def _on_device(self, inputs: dict[str, np.ndarray]) -> dict:
        """int64 (batch, seq) arrays -> CUDA tensors for the engine's inputs."""
        torch = self._torch
        return {
            k: torch.from_numpy(np.ascontiguousarray(v)).to(self.device, torch.int64) for k, v in inputs.items() if k in self.input_names
        }

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """(batch, seq) int64 arrays by input name -> logits (batch, num_labels) float32 on the host."""
        torch = self._torch
        out = self.run_torch(self._on_device(inputs))
        torch.cuda.current_stream(self.device).synchronize()
        return out.float().cpu().numpy()

    def bind(self, inputs: dict[str, np.ndarray]):
        """Inputs placed on the GPU once; the returned call times only the engine (+ a stream sync)."""
        torch = self._torch
        dev = self._on_device(inputs)

        def call() -> None:
            self.run_torch(dev)
            torch.cuda.current_stream(self.device).synchronize()

        return call


def build(onnx_path: Path, precision: str, cfg: EngineConfig, run_dir: Path) -> TrtEngine:
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
