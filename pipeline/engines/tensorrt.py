"""TensorRT engine (engine=tensorrt), written for TensorRT 10+ (name-based I/O; no binding indices).

Explicit quantization: the Q/DQ ONNX is parsed as is, TensorRT runs every GEMM whose inputs carry
Q/DQ in INT8 and the rest in FP16 (builder flag, or the ONNX types with a strongly-typed network).
Build: optimization profile (min/opt/max batch and sequence, from config), workspace limit,
builder optimization level, a timing cache file reused across runs, detailed profiling verbosity so
the engine inspector can report each layer's precision. Inference: torch CUDA tensors as I/O
(no pycuda), execute_async_v3 on the current torch stream, dynamic shapes per call.

TensorRT is imported lazily: where it or a GPU is missing, `check()` reports it at validation,
before any stage runs. Not executed on these CPU machines: see README "Where each feature was verified".
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from pipeline.outputs import atomic_write, write_json
from pipeline.schema import EngineConfig

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install tensorrt (TensorRT 10+, needs network access to NVIDIA's index pypi.nvidia.com) on a machine with an NVIDIA GPU"


def check(cfg: EngineConfig) -> list[str]:
    problems = []
    try:
        import tensorrt as trt

        major = int(trt.__version__.split(".")[0])
        if major < 10:
            problems.append(f"engine=tensorrt: TensorRT {trt.__version__} found; TensorRT 10+ is required; {INSTALL_HINT}")
    except ImportError:
        problems.append(f"engine=tensorrt: the tensorrt Python package is not installed; {INSTALL_HINT}")
    import torch

    if not torch.cuda.is_available():
        problems.append(
            "engine=tensorrt: no CUDA GPU visible to torch; TensorRT engines build and run on NVIDIA GPUs only (use engine=onnxruntime here)"
        )
    return problems


def profile_shapes(cfg: EngineConfig, input_names: list[str]) -> dict[str, tuple[tuple[int, int], tuple[int, int], tuple[int, int]]]:
    """(min, opt, max) shape of every (batch, sequence) input for the optimization profile."""
    lo, opt, hi = (cfg.min_batch, cfg.min_seq), (cfg.opt_batch, cfg.opt_seq), (cfg.max_batch, cfg.max_seq)
    return {name: (lo, opt, hi) for name in input_names}


def parse_inspector(info: str | dict) -> dict:
    """Per-layer precision from the engine inspector's JSON (ProfilingVerbosity.DETAILED).

    Format (TensorRT 10): {"Layers": [{"Name", "LayerType", "Inputs": [{"Name", "Format/Datatype",
    ...}], "Outputs": [...], ...}], "Bindings": [...]}. A layer's precision is the lowest-precision
    datatype among its inputs (a GEMM reading Int8 tensors runs an INT8 kernel). With LAYER_NAMES_ONLY
    verbosity, layers are plain strings and precision is "unknown".
    """
    data = json.loads(info) if isinstance(info, str) else info
    rows, counts = [], {}
    for layer in data.get("Layers", []):
        if isinstance(layer, str):
            rows.append({"name": layer, "type": "unknown", "precision": "unknown"})
            counts["unknown"] = counts.get("unknown", 0) + 1
            continue
        dtypes = [_dtype(t.get("Format/Datatype", "")) for t in layer.get("Inputs", [])]
        precision = min(dtypes, key=_RANK.index) if dtypes else "none"
        rows.append({"name": layer.get("Name", "?"), "type": layer.get("LayerType", "?"), "precision": precision, "inputs": dtypes})
        counts[precision] = counts.get(precision, 0) + 1
    gemm_types = ("gemm", "matrixmultiply", "convolution", "myelin", "foreignnode")
    gemms = [r for r in rows if any(g in r["type"].lower() for g in gemm_types)]
    return {
        "layers": rows,
        "by_precision": counts,
        "gemm_layers": len(gemms),
        "gemm_int8": sum(r["precision"] == "int8" for r in gemms),
        "gemm_fp8": sum(r["precision"] == "fp8" for r in gemms),
    }


_RANK = ["fp8", "int8", "fp16", "bf16", "fp32", "int32", "int64", "bool", "other", "none"]


def _dtype(fmt: str) -> str:
    f = fmt.lower()
    for key, name in (
        ("fp8", "fp8"),
        ("int8", "int8"),
        ("half", "fp16"),
        ("fp16", "fp16"),
        ("bf16", "bf16"),
        ("float", "fp32"),
        ("fp32", "fp32"),
        ("int32", "int32"),
        ("int64", "int64"),
        ("bool", "bool"),
    ):
        if key in f:
            return name
    return "other"


class TrtEngine:
    def __init__(self, onnx_path: Path, precision: str, cfg: EngineConfig, run_dir: Path):
        import tensorrt as trt
        import torch

        self.precision = "int8" if precision == "int8" else ("fp16" if cfg.fp16 else "fp32")
        self._torch = torch
        self.device = torch.device("cuda", cfg.device_id)
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if cfg.strongly_typed else 0
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
        self.input_names = [network.get_input(i).name for i in range(network.num_inputs)]
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(cfg.workspace_gb * (1 << 30)))
        config.builder_optimization_level = cfg.optimization_level
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
        if not cfg.strongly_typed:  # strongly typed networks take precisions from the ONNX types instead
            if cfg.fp16:
                config.set_flag(trt.BuilderFlag.FP16)
            if precision == "int8":
                config.set_flag(trt.BuilderFlag.INT8)  # honours the Q/DQ (explicit quantization); no calibrator
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
        plan_path = atomic_write(run_dir / f"model_{self.precision}.plan", lambda p: p.write_bytes(bytes(plan)))
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(bytes(plan))
        self.context = self.engine.create_execution_context()
        inspector = self.engine.create_engine_inspector()
        inspector.execution_context = self.context
        info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
        inspect_path = write_json(run_dir / f"model_{self.precision}.inspector.json", info)
        summary = parse_inspector(info)
        write_json(run_dir / f"model_{self.precision}.layers.json", summary)
        self.files = {"plan": plan_path, "inspector": inspect_path}
        self.kernels = {f"layers_{k}": v for k, v in summary["by_precision"].items()} | {
            "gemm_int8": summary["gemm_int8"],
            "gemm_layers": summary["gemm_layers"],
        }
        self.output_name = next(
            self.engine.get_tensor_name(i)
            for i in range(self.engine.num_io_tensors)
            if self.engine.get_tensor_mode(self.engine.get_tensor_name(i)) == trt.TensorIOMode.OUTPUT
        )
        self._out_dtype = {trt.float32: torch.float32, trt.float16: torch.float16}[self.engine.get_tensor_dtype(self.output_name)]

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
    return TrtEngine(onnx_path, precision, cfg, run_dir)
