"""ONNX Runtime engine: an InferenceSession per precision, its optimized graph saved and inspected.

On CPU, ORT's QDQ transformers fuse DequantizeLinear -> MatMul into MatMulIntegerToFloat (int8 GEMM
with float output) or QLinearMatMul (int8 in and out). Counting those nodes in the saved optimized
graph is the proof that INT8 kernels run, not just Q/DQ arithmetic in float.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

from pipeline.schema import EngineConfig

log = logging.getLogger(__name__)

INT8_OPS = ("MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger", "QGemm", "QAttention", "DynamicQuantizeMatMul", "QLinearConv")
FLOAT_GEMM_OPS = ("MatMul", "Gemm", "FusedMatMul", "FusedGemm")

_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def check(cfg: EngineConfig) -> list[str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return ["engine=onnxruntime: the onnxruntime package is not installed (pip install onnxruntime, or onnxruntime-gpu for CUDA)"]
    available = ort.get_available_providers()
    return [
        f"engine.providers: {p} is not available in this onnxruntime build; available: {', '.join(available)}"
        for p in cfg.providers
        if p not in available
    ]


class OrtEngine:
    def __init__(self, onnx_path: Path, precision: str, cfg: EngineConfig, run_dir: Path):
        import onnxruntime as ort

        self.precision = precision
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
        if cfg.transformer_fusions and precision == "int8":
            # Between the int8 GEMMs an encoder layer runs bias adds, residual adds, LayerNorms and GELU
            # as separate passes over the activations; fused, they are two kernels per layer
            # (SkipLayerNormalization, BiasGelu). Q/DQ pairs and the int8 GEMMs are left as they are.
            try:
                onnx_path = transformer_fusions(Path(onnx_path), run_dir / f"{Path(onnx_path).stem}.fused.onnx")
                self.files["fused_graph"] = onnx_path
            except Exception as exc:  # the optimizer's pattern code does not know every architecture
                log.warning("engine: ONNX Runtime transformer fusions failed on %s (%s); using the graph unfused", onnx_path, exc)
        if cfg.save_optimized:
            opt = run_dir / f"{Path(onnx_path).stem}.ort_optimized.onnx"
            so.optimized_model_filepath = str(opt)
            self.files["optimized_graph"] = opt
        providers = [(p, dict(cfg.provider_options[p])) if p in cfg.provider_options else p for p in cfg.providers]
        self.session = ort.InferenceSession(str(onnx_path), so, providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        # CUDA / TensorRT providers: inputs and outputs bound on the GPU (no host copies when timing).
        self.on_gpu = self.session.get_providers()[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
        self.device_id = int(cfg.provider_options.get(self.session.get_providers()[0], {}).get("device_id", 0))
        # ORT's CPU provider has no FP8 GEMM and no FP16 MatMul kernels on x86: such graphs run (with
        # FP16 / FP8 rounding of every stored tensor) but their speed means nothing, so they are not timed.
        self.emulated = "CPUExecutionProvider" == self.session.get_providers()[0] and precision not in ("fp32", "int8")
        self.kernels: dict[str, int] = {}
        self.fp32_fallback: dict[str, int] | None = None
        if cfg.save_optimized:
            self.kernels = count_ops(self.files["optimized_graph"], INT8_OPS + FLOAT_GEMM_OPS)
        if self.emulated and precision != "fp8":
            self.fp32_fallback = fp32_fallback_ops(Path(onnx_path))

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


def count_ops(path: Path, ops: tuple[str, ...] | None = None) -> dict[str, int]:
    counts = Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)
    return {k: v for k, v in sorted(counts.items()) if ops is None or k in ops}


# CPU features with which ONNX Runtime's x86 int8 GEMMs accumulate u8 x s8 products without int16
# saturation (VNNI dot products, AMX tiles).
_NO_SATURATION_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def weight_range_for(cfg: EngineConfig, cpu_flags: set[str] | None = None, machine: str | None = None) -> tuple[str, str]:
    """Resolve quant.weight_range=auto: ("reduced" | "full", why).

    ONNX Runtime's x86 int8 MatMul without VNNI uses vpmaddubsw, which sums two u8 x s8 products in
    int16 and saturates once |weight| > 64 (measured here on an AVX2-only EPYC: a 16x8 QDQ Linear off
    by 0.41 against ORT's unfused graph with full-range weights, exact with |w| <= 64).
    """
    import platform

    machine = machine or platform.machine()
    if cfg.name != "onnxruntime" or cfg.providers[0] != "CPUExecutionProvider":
        return "full", f"engine {cfg.name} ({cfg.providers[0] if cfg.name == 'onnxruntime' else 'GPU'}) has no int16 saturation"
    if machine.lower() not in ("x86_64", "amd64", "i386", "i686"):
        return "full", f"{machine} CPU: ONNX Runtime's int8 kernels there do not saturate"
    if cpu_flags is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
            cpu_flags = {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}
        except OSError:
            return "full", "CPU features unknown (no /proc/cpuinfo); set quant.weight_range=reduced on an x86 CPU without VNNI"
    have = [f for f in _NO_SATURATION_FLAGS if f in cpu_flags]
    if have:
        return "full", f"x86 CPU with {have[0]}: int8 dot products accumulate without saturation"
    return (
        "reduced",
        "x86 CPU without VNNI (no avx512_vnni / avx_vnni / amx_int8): ONNX Runtime's u8 x s8 int16 pairs saturate beyond |w| = 64",
    )


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


def build(onnx_path: Path, precision: str, cfg: EngineConfig, run_dir: Path) -> OrtEngine:
    return OrtEngine(onnx_path, precision, cfg, run_dir)
