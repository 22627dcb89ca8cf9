"""ONNX Runtime engine: an InferenceSession per precision, its optimized graph saved and inspected.

On CPU, ORT's QDQ transformers fuse DequantizeLinear -> MatMul into MatMulIntegerToFloat (int8 GEMM
with float output) or QLinearMatMul (int8 in and out). Counting those nodes in the saved optimized
graph is the proof that INT8 kernels run, not just Q/DQ arithmetic in float.

GPU providers: the session must run on the provider asked for first (a provider that fails to load makes
ONNX Runtime fall back silently: refused here). On CUDAExecutionProvider a Q/DQ graph is `emulated` (float
GEMMs between Q/DQ, not timed) unless one profiled run shows an INT8 kernel on CUDA. TensorrtExecutionProvider
gets TensorRT's own graphs (`provider_graphs`), the engine's optimization profile and caches
(`tensorrt_provider_options`), and no optimized-graph file (TensorRT-compiled nodes cannot be serialized).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

from pipeline.engines.base import GRAPHS, x86_int8_saturation
from pipeline.schema import EngineConfig, OnnxRuntimeEngineConfig

log = logging.getLogger(__name__)

INT8_OPS = ("MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger", "QGemm", "QAttention", "DynamicQuantizeMatMul", "QLinearConv")
FLOAT_GEMM_OPS = ("MatMul", "Gemm", "FusedMatMul", "FusedGemm")

_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def check(cfg: OnnxRuntimeEngineConfig) -> list[str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return ["engine=onnxruntime: the onnxruntime package is not installed (pip install onnxruntime, or onnxruntime-gpu for CUDA)"]
    available = ort.get_available_providers()
    problems = [
        f"engine.providers: {p} is not available in this onnxruntime build; available: {', '.join(available)}"
        for p in cfg.providers
        if p not in available
    ]
    if TRT_PROVIDER in cfg.providers and TRT_PROVIDER in available:
        problems += trt_provider_problems(ort.__version__, installed_tensorrt())
    return problems


# The provider that runs each precision's graph through TensorRT, and the providers that run on the GPU.
TRT_PROVIDER = "TensorrtExecutionProvider"
GPU_PROVIDERS = ("CUDAExecutionProvider", TRT_PROVIDER)
# ONNX Runtime's TensorRT provider links the TensorRT it was built against; TensorRT 11 removed APIs the provider
# used. "Third-party code that links against TensorRT 11.x - including the ONNX Runtime TensorRT Execution Provider -
# must migrate away from this API. ONNX Runtime 1.27+ supports TensorRT 11.x." (TensorRT migration guide 10.x ->
# 11.x, "Removed C++ APIs and Replacements", the entry for the FP16 platform query). Earlier onnxruntime-gpu releases load
# TensorRT 10.x only (ONNX Runtime docs, TensorRT Execution Provider > Requirements: 1.22 -> TensorRT 10.9).
ORT_FOR_TENSORRT_11 = (1, 27)


def trt_provider_problems(ort_version: str, tensorrt_version: str | None) -> list[str]:
    """The onnxruntime-gpu / TensorRT pairing the TensorRT provider needs: TensorRT 11 only from ONNX Runtime 1.27."""
    from pipeline.engines.tensorrt import version_tuple

    if tensorrt_version and version_tuple(tensorrt_version)[:1] >= (11,) and version_tuple(ort_version)[:2] < ORT_FOR_TENSORRT_11:
        return [
            f"engine.providers: TensorrtExecutionProvider of onnxruntime {ort_version} loads TensorRT 10.x only, and TensorRT "
            f"{tensorrt_version} is installed: install onnxruntime-gpu>=1.27 (TensorRT 11 support) or TensorRT 10.x libraries "
            f"for it (tensorrt-cu12-libs<11)"
        ]
    return []


def installed_tensorrt() -> str | None:
    """The installed TensorRT version from package metadata (without importing it), or None."""
    from importlib import metadata

    for name in ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu13-libs", "tensorrt-cu12-libs"):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def provider_graphs(cfg: EngineConfig, fmt: str) -> dict[str, str] | None:
    """The graphs ONNX Runtime must build from when its TensorRT provider leads, else None (the ONNX Runtime ones).

    TensorRT's parser takes signed INT8 / FP8 Q/DQ only, while model_int8.onnx (ONNX Runtime's graph) quantizes the
    softmax output to UINT8; and with TensorRT 11 precision comes from the graph's types. So the TensorRT provider
    gets TensorRT's own graphs: model_fp16.onnx as the baseline and model_int8_trt.onnx / model_fp8.onnx
    (pipeline.engines.GRAPHS["tensorrt"]).

    Args:
        cfg: the engine config (engine.name, engine.providers).
        fmt: quant.format ("int8" or "fp8").
    """
    if cfg.name != "onnxruntime" or not cfg.providers or cfg.providers[0] != TRT_PROVIDER:
        return None
    return dict(GRAPHS["tensorrt"][fmt])


def tensorrt_provider_options(cfg: OnnxRuntimeEngineConfig, input_names: list[str], cache_dir: Path) -> dict[str, object]:
    """TensorrtExecutionProvider options from the engine config: the same optimization profile as engine=tensorrt.

    Profiles: "trt_profile_min_shapes" / "_opt_" / "_max_": "input1:dim1xdim2...,input2:..." for every dynamic input
    (ONNX Runtime PR #15546, "Support explicit TRT profiles from provider options"). Engine and timing caches in
    `cache_dir` (trt_engine_cache_enable/_path, trt_timing_cache_enable/_path). No trt_fp16_enable / trt_int8_enable:
    the graph's types are the precision (TensorRT 11 is strongly typed; model_int8_trt.onnx carries explicit Q/DQ).
    Options the user sets in engine.provider_options override these.
    """
    from pipeline.engines.tensorrt import profile_shapes

    shapes = profile_shapes(cfg, input_names)

    def spec(i: int) -> str:
        return ",".join(f"{name}:{'x'.join(str(d) for d in s[i])}" for name, s in shapes.items())

    return {
        "device_id": cfg.device_id,
        "trt_max_workspace_size": int(cfg.workspace_gb * (1 << 30)),
        "trt_builder_optimization_level": cfg.optimization_level,
        "trt_profile_min_shapes": spec(0),
        "trt_profile_opt_shapes": spec(1),
        "trt_profile_max_shapes": spec(2),
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache_dir / "engines"),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache_dir / "timing"),
    }


def _trt_cache_dir(cfg: OnnxRuntimeEngineConfig, run_dir: Path) -> Path:
    """Where the TensorRT provider keeps engines and timing caches: beside engine.timing_cache, keyed by the
    onnxruntime version (its engines are not portable across ONNX Runtime / TensorRT versions), else in the run."""
    import onnxruntime as ort

    base = Path(cfg.timing_cache).expanduser().parent if cfg.timing_cache else Path(run_dir)
    return base / f"ort_trt_{ort.__version__}"


# Quantized precisions: on the CUDA provider their Q/DQ graphs run in float unless INT8 kernels are proven.
_QUANTIZED = ("int8", "fp8")


class OrtEngine:
    def __init__(self, onnx_path: Path, precision: str, cfg: OnnxRuntimeEngineConfig, run_dir: Path):
        import onnxruntime as ort

        self.precision = precision
        requested = cfg.providers[0]
        trt_first = requested == TRT_PROVIDER
        if trt_first:
            _refuse_unsigned_qdq(Path(onnx_path))
        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[cfg.graph_optimization])
        if cfg.intra_op_threads:
            so.intra_op_num_threads = cfg.intra_op_threads
        if not cfg.allow_spinning:
            # Idle pool threads otherwise busy-wait after each op; with the FP32 and INT8 sessions
            # interleaved on a small machine, one session's spinning threads steal the other's cores
            # (benchmarks/ort_threads.py, 2 cores, batch 8 x seq 128: FP32 90 -> 61 ms, INT8 50 -> 29 ms).
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3  # the NCHWc serialization warning is expected and not actionable
        self.files: dict[str, Path] = {}
        if cfg.transformer_fusions and precision == "int8" and not trt_first:
            # Between the int8 GEMMs an encoder layer runs bias adds, residual adds, LayerNorms and GELU
            # as separate passes over the activations; fused, they are two kernels per layer
            # (SkipLayerNormalization, BiasGelu). Q/DQ pairs and the int8 GEMMs are left as they are.
            # (Not for the TensorRT provider: TensorRT parses standard ONNX ops only.)
            try:
                onnx_path = transformer_fusions(Path(onnx_path), run_dir / f"{Path(onnx_path).stem}.fused.onnx")
                self.files["fused_graph"] = onnx_path
            except Exception as exc:  # the optimizer's pattern code does not know every architecture
                log.warning("engine: ONNX Runtime transformer fusions failed on %s (%s); using the graph unfused", onnx_path, exc)
        # ONNX Runtime cannot serialize a graph whose nodes TensorRT compiled (it fails, or falls back to other
        # providers printing only "EP Error"): no optimized graph with the TensorRT provider.
        save_optimized = cfg.save_optimized and TRT_PROVIDER not in cfg.providers
        if cfg.save_optimized and not save_optimized:
            log.info("engine: not saving ONNX Runtime's optimized graph: the TensorRT provider's compiled nodes cannot be serialized")
        if save_optimized:
            opt = run_dir / f"{Path(onnx_path).stem}.ort_optimized.onnx"
            so.optimized_model_filepath = str(opt)
            self.files["optimized_graph"] = opt
        options = {p: dict(cfg.provider_options.get(p, {})) for p in cfg.providers}
        if TRT_PROVIDER in options:
            names = [i.name for i in onnx.load(str(onnx_path), load_external_data=False).graph.input]
            options[TRT_PROVIDER] = tensorrt_provider_options(cfg, names, _trt_cache_dir(cfg, run_dir)) | options[TRT_PROVIDER]
            Path(options[TRT_PROVIDER]["trt_engine_cache_path"]).mkdir(parents=True, exist_ok=True)
            Path(options[TRT_PROVIDER]["trt_timing_cache_path"]).mkdir(parents=True, exist_ok=True)
        providers = [(p, options[p]) if options[p] else p for p in cfg.providers]
        profile_probe = requested == "CUDAExecutionProvider" and precision in _QUANTIZED
        if profile_probe:
            so.enable_profiling = True
            so.profile_file_prefix = str(run_dir / f"{Path(onnx_path).stem}.ort_profile")
        self.session = ort.InferenceSession(str(onnx_path), so, providers=providers)
        active = self.session.get_providers()
        # A provider that fails to load (CUDA / cuDNN / TensorRT libraries, driver) makes ONNX Runtime fall back
        # to the next one, printing only a log line: numbers labelled CUDA or TensorRT would be CPU numbers.
        if not active or active[0] != requested:
            raise RuntimeError(
                f"ONNX Runtime did not start {requested} for {Path(onnx_path).name}: the session runs on "
                f"{', '.join(active) or 'nothing'} (a silent fallback; ONNX Runtime's log says which library failed to load). "
                f"Refusing to report {active[0] if active else 'its'} numbers as {requested}"
            )
        self.input_names = [i.name for i in self.session.get_inputs()]
        # CUDA / TensorRT providers: inputs and outputs bound on the GPU (no host copies when timing).
        self.on_gpu = requested in GPU_PROVIDERS
        self.device_id = int(options.get(requested, {}).get("device_id", 0))
        # ORT's CPU provider has no FP8 GEMM and no FP16 MatMul kernels on x86: such graphs run (with
        # FP16 / FP8 rounding of every stored tensor) but their speed means nothing, so they are not timed.
        self.emulated = requested == "CPUExecutionProvider" and precision not in ("fp32", "int8")
        self.kernels: dict[str, int] = {}
        self.fp32_fallback: dict[str, int] | None = None
        if save_optimized:
            self.kernels = count_ops(self.files["optimized_graph"], INT8_OPS + FLOAT_GEMM_OPS)
        if profile_probe:
            # ONNX Runtime's Q/DQ -> int8 GEMM fusions are CPU-provider transformations: on the CUDA provider a Q/DQ
            # graph computes its GEMMs in float between Q/DQ arithmetic unless a node with an INT8 kernel runs on it.
            # One profiled run says which provider ran which op.
            try:
                ran = _profile_once(self.session, self._dummy_feed())
            except Exception as exc:  # an input that is not a (batch, seq) int64 tensor: nothing proven
                log.warning("engine: could not profile %s on CUDAExecutionProvider (%s)", Path(onnx_path).name, exc)
                ran = {}
            proven = {op: n for op, n in ran.get("CUDAExecutionProvider", {}).items() if op in INT8_OPS}
            self.kernels |= {f"cuda_{op}": n for op, n in proven.items()}
            self.emulated = not proven
            if self.emulated:
                log.warning(
                    "engine: %s on CUDAExecutionProvider runs its Q/DQ in float (no INT8 kernel ran on CUDA: %s); "
                    "accuracy is measured, speed is not: use engine=tensorrt or the TensorRT provider for INT8 on a GPU",
                    Path(onnx_path).name,
                    dict(ran.get("CUDAExecutionProvider", {})),
                )
        if self.emulated and precision != "fp8" and requested == "CPUExecutionProvider":
            self.fp32_fallback = fp32_fallback_ops(Path(onnx_path))

    def _dummy_feed(self) -> dict[str, np.ndarray]:
        """Ones of shape (1, 8) for every (batch, seq) input: enough to execute every node once."""
        return {i.name: np.ones((1, 8), dtype=np.int64) for i in self.session.get_inputs()}

    def _feed(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: inputs[k].astype(np.int64, copy=False) for k in self.input_names}

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(None, self._feed(inputs))[0]

    def bind(self, inputs: dict[str, np.ndarray]):
        """A call that runs the engine on inputs placed once (IO binding on the GPU providers)."""
        feed = self._feed(inputs)
        if not self.on_gpu:
            return lambda: self.session.run(None, feed)
        import onnxruntime as ort

        binding = self.session.io_binding()
        for name, arr in feed.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(arr, "cuda", self.device_id))
        binding.bind_output(self.session.get_outputs()[0].name, "cuda", self.device_id)

        def call() -> None:
            self.session.run_with_iobinding(binding)
            binding.synchronize_outputs()

        return call


def _refuse_unsigned_qdq(onnx_path: Path) -> None:
    """Refuses, for the TensorRT provider, a graph with UINT8 or non-zero-point Q/DQ (model_int8.onnx's softmax).

    TensorRT's parser takes signed INT8 / FP8 Q/DQ only (onnx-tensorrt docs/operators.md: UINT8 only as a network
    input or output type); the TensorRT provider must get TensorRT's own graphs (`provider_graphs`).

    Raises:
        ValueError: naming the first offending tensor and the graph to use instead.
    """
    from pipeline.engines.trt_rules import check_tensorrt

    bad = [v for v in check_tensorrt(onnx_path) if v.rule in ("qdq-type", "zero-point")]
    if bad:
        v = bad[0]
        raise ValueError(
            f"{onnx_path.name} is not a graph for TensorrtExecutionProvider ({len(bad)} Q/DQ TensorRT's parser takes wrongly, "
            f"first: {v.rule}: {v.node}: {v.message}); give the TensorRT provider model_fp16.onnx / model_int8_trt.onnx / "
            f"model_fp8.onnx (pipeline.engines.onnxruntime.provider_graphs)"
        )


def _profile_once(session: object, feed: dict[str, np.ndarray]) -> dict[str, dict[str, int]]:
    """Runs the (profiling-enabled) session once and ends profiling; which ops each provider ran (`ops_by_provider`)."""
    try:
        session.run(None, feed)
    finally:
        path = session.end_profiling()
    return ops_by_provider(Path(path))


def ops_by_provider(profile_path: Path) -> dict[str, dict[str, int]]:
    """Op types each execution provider ran, from an ONNX Runtime profile (SessionOptions.enable_profiling).

    The profile is a JSON list of trace events; a node's kernel event has "cat": "Node" and
    "args": {"op_name": ..., "provider": ...}. Each node counts once, whatever the number of runs.

    Returns:
        {provider: {op_type: nodes}}, op types sorted.
    """
    events = json.loads(Path(profile_path).read_text())
    nodes: dict[str, dict[str, str]] = {}
    for e in events:
        args = e.get("args", {}) if isinstance(e, dict) else {}
        if e.get("cat") == "Node" and "provider" in args and "op_name" in args:
            nodes.setdefault(args["provider"], {})[str(e.get("name", "")).removesuffix("_kernel_time")] = args["op_name"]
    return {p: dict(sorted(Counter(ops.values()).items())) for p, ops in sorted(nodes.items())}


def count_ops(path: Path, ops: tuple[str, ...] | None = None) -> dict[str, int]:
    counts = Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)
    return {k: v for k, v in sorted(counts.items()) if ops is None or k in ops}


def weight_range_for(cfg: EngineConfig, cpu_flags: set[str] | None = None, machine: str | None = None) -> tuple[str, str]:
    """Resolve quant.weight_range=auto: ("reduced" | "full", why).

    ONNX Runtime's x86 int8 MatMul without VNNI uses vpmaddubsw, which sums two u8 x s8 products in
    int16 and saturates once |weight| > 64 (measured here on an AVX2-only EPYC: a 16x8 QDQ Linear off
    by 0.41 against ORT's unfused graph with full-range weights, exact with |w| <= 64).
    """
    if cfg.name != "onnxruntime" or cfg.providers[0] != "CPUExecutionProvider":
        return "full", f"engine {cfg.name} ({cfg.providers[0] if cfg.name == 'onnxruntime' else 'GPU'}) has no int16 saturation"
    return x86_int8_saturation("ONNX Runtime", cpu_flags, machine)


def fp32_fallback_ops(onnx_path: Path) -> dict[str, int]:
    """Nodes of an FP16 graph that ONNX Runtime's CPU provider computes in FP32, by op type.

    Where the CPU provider has no FP16 kernel for a node, ORT's InsertCastTransformer wraps it in Casts
    (FP16 -> FP32 in, FP32 -> FP16 out): the node computes in FP32 on values rounded to FP16, like a
    GPU kernel that accumulates in FP32. Found by comparing each node's input type in the graph with
    its input type in ORT's own rewrite of it (basic optimization level, so node names survive and
    ONNX type inference still applies).
    """
    import tempfile

    import onnxruntime as ort

    from pipeline.onnx_export import inferred_types

    def input_types(m: onnx.ModelProto) -> dict[str, int]:
        types = inferred_types(m)
        return {n.name: types.get(n.input[0], 0) for n in m.graph.node if n.input and n.op_type != "Cast"}

    original = onnx.load(str(onnx_path))
    fp16_nodes = {name for name, t in input_types(original).items() if t == onnx.TensorProto.FLOAT16}
    op = {n.name: n.op_type for n in original.graph.node}
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(Path(tmp) / "basic.onnx")
        so.log_severity_level = 3
        ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        rewritten = input_types(onnx.load(so.optimized_model_filepath))
    fallback = Counter(op[n] for n, t in rewritten.items() if n in fp16_nodes and t == onnx.TensorProto.FLOAT)
    return dict(sorted(fallback.items()))


def transformer_fusions(src: Path, out: Path, num_heads: int = 0, hidden_size: int = 0) -> Path:
    """ONNX Runtime's transformer optimizer (Attention, SkipLayerNormalization, BiasGelu, ... fusions).

    model_type "bert" is ORT's encoder fusion set (it also serves RoBERTa, DistilBERT, ...); fusions that
    do not match an architecture are simply not applied. QOrdered* fusions are off: those contrib ops
    exist for CUDA only, and a CPU session would refuse the graph.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.enable_qordered_matmul = False
    model = optimize_model(
        str(src), model_type="bert", num_heads=num_heads, hidden_size=hidden_size, optimization_options=options, use_gpu=False
    )
    model.save_model_to_file(str(out))
    return out


def build(onnx_path: Path, precision: str, cfg: OnnxRuntimeEngineConfig, run_dir: Path) -> OrtEngine:
    return OrtEngine(onnx_path, precision, cfg, run_dir)
