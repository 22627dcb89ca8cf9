"""OpenVINO engine (CPU): reads the exported Q/DQ ONNX directly, or an OpenVINO IR (.xml, the NNCF peer).

OpenVINO's low-precision transformations turn each DequantizeLinear -> MatMul of the Q/DQ graph into an
int8 `FullyConnected` (u8/s8 activations x s8 weights) and the attention matmuls into an int8 `Subgraph`.
The proof is read from the compiled model's runtime graph: each layer's rt_info `layerType` and
`runtimePrecision` (e.g. FullyConnected / i8, primitiveType brgemm_avx512_amx_i8).

Layers that are not quantized compute in the plugin's inference precision: f32, or bf16 by default on
CPUs with bf16 units (AMX / AVX512_BF16). `engine.inference_precision` sets it; the precision actually
used is recorded on the engine (`inference_precision`).
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from pipeline.engines.base import cpu_flags, x86_int8_saturation
from pipeline.schema import EngineConfig, OpenVinoEngineConfig

log = logging.getLogger(__name__)

# Layer types of OpenVINO's CPU runtime graph that are GEMMs (the int8 proof counts these in i8 / u8).
GEMM_LAYERS = ("FullyConnected", "MatMul", "Convolution")
# Fused attention: the CPU plugin's "Subgraph" (snippets: Q.K^T, softmax, P.V) and SDPA.
ATTENTION_LAYERS = ("Subgraph", "ScaledDotProductAttention")
INT8_PRECISIONS = ("i8", "u8")
# Float engine precision label -> the OpenVINO inference precision it runs in.
_FLOAT_HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
# engine.inference_precision -> the CPU capability (OPTIMIZATION_CAPABILITIES) it needs.
_NEEDS = {"bf16": "BF16", "f16": "FP16"}


@functools.cache
def _core():
    import openvino as ov

    return ov.Core()


def cpu_capabilities() -> list[str]:
    """OpenVINO's OPTIMIZATION_CAPABILITIES of this CPU, e.g. ['BF16', 'FP32', 'FP16', 'INT8', ...]."""
    return list(_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def check(cfg: OpenVinoEngineConfig) -> list[str]:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return ["engine=openvino: the openvino package is not installed (pip install openvino)"]
    errors = []
    if "CPU" not in _core().available_devices:
        errors.append(f"engine=openvino: OpenVINO sees no CPU device; available: {', '.join(_core().available_devices) or 'none'}")
    elif cfg.inference_precision in _NEEDS and _NEEDS[cfg.inference_precision] not in (caps := cpu_capabilities()):
        errors.append(
            f"engine.inference_precision: {cfg.inference_precision} is not supported by OpenVINO on this CPU "
            f"(OPTIMIZATION_CAPABILITIES: {', '.join(caps)}); valid values here: auto, default, f32"
            + "".join(f", {p}" for p, c in _NEEDS.items() if c in caps)
        )
    return errors


def float_layer_precision(asked: str, flags: set[str] | None = None) -> tuple[str | None, str]:
    """engine.inference_precision -> (INFERENCE_PRECISION_HINT for a quantized engine's float layers, or None
    for the plugin's own choice; why).

    auto, measured on this project's model_int8.onnx (docs/results/openvino.md): on an AMX Xeon the plugin's
    bf16 float layers (parity 99.22 % argmax vs fake quant); without AMX (AMD EPYC, AVX512_BF16) the plugin
    also picks bf16, but there f32 float layers are as fast (same-run p50 f32 / bf16 0.94-1.01 over the six
    grid cells) and parity rises from 98.24 % to 99.22 %: f32."""
    if asked != "auto":
        return (None if asked == "default" else asked), f"engine.inference_precision={asked}"
    flags = cpu_flags() if flags is None else flags
    if flags is not None and "amx_bf16" in flags:
        return None, "auto: AMX CPU, the plugin's bf16 float layers (measured parity 99.22 %)"
    return "f32", "auto: no AMX, f32 float layers (bf16 no faster here; parity 98.24 % -> 99.22 % measured on AVX512_BF16)"


class OvEngine:
    def __init__(self, model_path: Path, precision: str, cfg: OpenVinoEngineConfig, run_dir: Path):
        model_path = Path(model_path)
        self.precision = precision
        self.files: dict[str, Path] = {}
        model = _core().read_model(str(model_path))  # ONNX (Q/DQ read as FakeQuantize) or IR .xml
        if model_path.suffix == ".xml":
            self.files["openvino_ir"] = model_path  # already an IR (NNCF peer): not written twice
        else:
            self.files["openvino_ir"] = save_ir(model, Path(run_dir) / f"{model_path.stem}.openvino.xml")
        props: dict[str, object] = {"PERFORMANCE_HINT": "LATENCY"}
        # A float engine computes in the precision it is labelled with (the fp32 baseline is exact f32 even
        # where the plugin would pick bf16); a quantized engine's float layers follow engine.inference_precision.
        self.precision_rule = float_layer_precision(cfg.inference_precision)
        hint = _FLOAT_HINTS.get(precision, self.precision_rule[0])
        if hint is not None:
            props["INFERENCE_PRECISION_HINT"] = hint
        if cfg.intra_op_threads:
            props["INFERENCE_NUM_THREADS"] = cfg.intra_op_threads
        self.compiled = _core().compile_model(model, "CPU", props)
        # What the plugin really uses for non-quantized layers ("f32", "bf16", "f16"): bf16 by default on AMX CPUs.
        self.inference_precision: str = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        if precision in _FLOAT_HINTS and self.inference_precision != _FLOAT_HINTS[precision]:
            raise RuntimeError(
                f"OpenVINO runs {self.inference_precision}, not {_FLOAT_HINTS[precision]}, on this CPU "
                f"(OPTIMIZATION_CAPABILITIES: {', '.join(cpu_capabilities())})"
            )
        self.input_names = [i.get_any_name() for i in self.compiled.inputs]
        self._dtypes = {i.get_any_name(): i.get_element_type().to_dtype() for i in self.compiled.inputs}
        # CPU kernels exist for fp32 / int8 (and bf16 / f16 where the CPU has them): timed like any engine. FP8 Q/DQ
        # is read correctly, but its weights are decompressed and the GEMMs run in f32 / bf16: emulated, not timed.
        self.emulated = precision not in ("fp32", "int8", "bf16", "fp16")
        self.kernels = runtime_kernels(self.compiled)
        self._request = self.compiled.create_infer_request()

    def _feed(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: np.ascontiguousarray(inputs[k], dtype=self._dtypes[k]) for k in self.input_names}

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        out = self._request.infer(self._feed(inputs))
        return np.array(out[0], dtype=np.float32)  # a copy: the request reuses its output buffer

    def bind(self, inputs: dict[str, np.ndarray]):
        """A call that runs one inference on inputs placed once (tensors set on a dedicated InferRequest)."""
        import openvino as ov

        request = self.compiled.create_infer_request()
        feed = self._feed(inputs)
        for name, arr in feed.items():
            request.set_tensor(name, ov.Tensor(arr, shared_memory=True))  # no copy: the tensor reads arr

        def call() -> None:
            request.infer()

        call.inputs = feed  # keeps the shared arrays alive as long as the call exists
        return call


def save_ir(model, xml: Path) -> Path:
    """ov.save_model to xml (+ .bin), atomically: written in a temp folder beside it, then renamed
    (.bin first, so an .xml that exists always has its weights)."""
    import openvino as ov

    xml.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=xml.parent, prefix=f".{xml.stem}.") as tmp:
        tmp_xml = Path(tmp) / xml.name
        ov.save_model(model, str(tmp_xml), compress_to_fp16=False)  # fp32 stays fp32: the float baseline
        os.replace(tmp_xml.with_suffix(".bin"), xml.with_suffix(".bin"))
        os.replace(tmp_xml, xml)
    return xml


def runtime_kernels(compiled) -> dict[str, int]:
    """ "layerType:runtimePrecision" -> count of the GEMM and attention layers of the compiled runtime graph,
    e.g. {"FullyConnected:i8": 12, "FullyConnected:bf16": 2, "Subgraph:i8": 2}."""
    counts: Counter[str] = Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layer = info["layerType"].astype(str)
        if layer in GEMM_LAYERS + ATTENTION_LAYERS:
            counts[f"{layer}:{info['runtimePrecision'].astype(str)}"] += 1
    return dict(sorted(counts.items()))


def int8_gemm_layers(kernels: dict[str, int]) -> int:
    """How many GEMM layers (FullyConnected, MatMul, Convolution) run in i8 / u8."""
    return sum(n for k, n in kernels.items() if k.split(":")[0] in GEMM_LAYERS and k.split(":")[1] in INT8_PRECISIONS)


def qdq_linear_error(weight_max: int = 127, activations: str = "u8") -> tuple[float, float, str]:
    """The weight-range measurement: (max |OpenVINO - exact|, max |exact|, the FullyConnected primitiveType).

    A 16x256 @ 256x64 Q/DQ Linear (per-channel s8 weights in [-weight_max, weight_max], per-tensor u8 or s8
    activations) with its 16 first weight rows at +weight_max and the matching activations at their
    maximum: adjacent u8 x s8 products then sum beyond int16 (2 x 255 x 127 > 32767) wherever the
    kernel pairs them in int16 (vpmaddubsw, x86 without VNNI). "exact" is the float64 result of the same
    Q/DQ arithmetic. Cap the ISA to see another CPU's kernel, e.g.
    ONEDNN_MAX_CPU_ISA=AVX2 python -c "from pipeline.engines.openvino import qdq_linear_error as e; print(e(127))"
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    b, k, n = 16, 256, 64
    w8 = rng.integers(-weight_max, weight_max + 1, size=(k, n)).astype(np.int8)
    w8[:16] = weight_max
    w_scale = (rng.uniform(0.5, 1.5, n) / 127).astype(np.float32)
    lo, hi, zp = (0, 255, np.uint8(0)) if activations == "u8" else (-128, 127, np.int8(0))
    a_scale = np.float32(1 / 64)
    x = (rng.uniform(lo, hi, size=(b, k)) * a_scale).astype(np.float32)
    x[:, :16] = hi * a_scale
    inits = [
        numpy_helper.from_array(w8, "w8"),
        numpy_helper.from_array(w_scale, "w_scale"),
        numpy_helper.from_array(np.zeros(n, np.int8), "w_zp"),
        numpy_helper.from_array(np.array(a_scale), "a_scale"),
        numpy_helper.from_array(np.array(zp), "a_zp"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "a_scale", "a_zp"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "a_scale", "a_zp"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w8", "w_scale", "w_zp"], ["wd"], axis=1),
        helper.make_node("MatMul", ["xd", "wd"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq_linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
        inits,
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "qdq_linear.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
        compiled = _core().compile_model(_core().read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    y = compiled(x)[0]
    xq = np.clip(np.round(x.astype(np.float64) / a_scale), lo, hi)
    exact = (xq * a_scale) @ (w8.astype(np.float64) * w_scale)
    primitive = next(
        op.get_rt_info()["primitiveType"].astype(str)
        for op in compiled.get_runtime_model().get_ordered_ops()
        if op.get_rt_info()["layerType"].astype(str) == "FullyConnected"
    )
    return float(np.abs(y - exact).max()), float(np.abs(exact).max()), primitive


def weight_range_for(cfg: EngineConfig, cpu_flags: set[str] | None = None, machine: str | None = None) -> tuple[str, str]:
    """Resolve quant.weight_range=auto for engine=openvino: ("reduced" | "full", why).

    OpenVINO's CPU int8 FullyConnected saturates with full-range weights on x86 CPUs without VNNI, like
    ONNX Runtime's u8 x s8 kernels. Measured with openvino 2026.4.1 on an AMX Xeon, ISA capped with
    ONEDNN_MAX_CPU_ISA (qdq_linear_error: a 16x256 @ 256x64 Q/DQ Linear, max activations on 16 rows of
    weight +127, vs the exact float result of the same Q/DQ graph; max |exact| 153 u8 / 85 s8 activations):
      no cap (brgemm_avx512_amx), AVX2_VNNI (brgemm_avx2), AVX512_CORE_VNNI: error < 1e-5;
      AVX2 (jit_gemm), AVX512_CORE (brgemm_avx512, no VNNI): error 52.0 for u8 and s8 activations alike;
      the same with |w| <= 64 (7-bit): error < 1e-5 under every cap, static or dynamic shapes.
    NNCF documents the same "overflow issue" (nncf.OverflowFix) for SSE / AVX2 / AVX-512 without VNNI.
    """
    if cfg.name != "openvino":
        raise ValueError(f"openvino.weight_range_for called for engine={cfg.name}")
    return x86_int8_saturation("OpenVINO", cpu_flags, machine)


def build(onnx_path: Path, precision: str, cfg: OpenVinoEngineConfig, run_dir: Path) -> OvEngine:
    return OvEngine(onnx_path, precision, cfg, run_dir)
