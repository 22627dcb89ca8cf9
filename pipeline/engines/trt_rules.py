"""Static checker of TensorRT's explicit-quantization rules for an ONNX graph (no TensorRT needed).

TensorRT cannot be installed on the machines this project is built on, so the graphs written for it
(`model_fp16.onnx`, `model_int8_trt.onnx`, `model_fp8.onnx`) are checked here against the rules its
documentation states, one rule per group below, each citing where it comes from:

    qdq-type      signed INT8 / FP8 (E4M3FN) Q/DQ only; no UINT8 tensor anywhere in the graph
    zero-point    every Q/DQ has a constant, all-zero zero point of INT8 / FP8 type
    scale         scales are constant, finite, strictly positive, float32 / float16 / bfloat16
    per-channel   per-channel scales only on constant weights, with an explicit axis (ONNX defaults it to 1, TensorRT
                  to 0), along the consuming GEMM's output-channel axis
    qdq-pairs     every Q feeds only DQs; every activation DQ reads a Q
    gemm-inputs   a MatMul / Gemm with exactly one Q/DQ input (TensorRT runs it in float)
    opset         opset within what TensorRT 10.x and 11.x parse; FP8 / FP16 scales need opset >= 19
    strong-types  ONNX strict type inference passes and operand types agree (strongly typed network)

Only the main graph is checked (encoders have no control-flow subgraphs).

    violations = check_tensorrt("outputs/.../model_int8_trt.onnx")   # [] when legal
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# Rule name -> what it enforces (one list; the CLI and README quote it).
RULES: dict[str, str] = {
    "qdq-type": "signed INT8 or FP8 (E4M3FN) Q/DQ only; no UINT8 tensor, initializer, Cast target or graph I/O",
    "zero-point": "Q/DQ zero point present, constant, INT8/FP8 typed and all zeros",
    "scale": "Q/DQ scale constant, finite, strictly positive, float32/float16/bfloat16",
    "per-channel": "per-channel scales only on constant weights, with an explicit axis, on the consuming GEMM's output-channel axis; no block quantization",
    "qdq-pairs": "each QuantizeLinear feeds only DequantizeLinear; each activation DequantizeLinear reads a QuantizeLinear",
    "gemm-inputs": "a MatMul/Gemm has both or neither of its inputs quantized",
    "opset": "default-domain opset within the TensorRT 10.x/11.x parsers' range; >= 19 for FP8 or FP16/BF16 scales",
    "strong-types": "strict ONNX type inference passes; DQ output / Q input type == scale type; MatMul/Add/Mul operand types equal",
}

# Quantized types TensorRT's GPU path takes through Q/DQ (8-bit ones: this project quantizes to 8 bits).
QUANT_TYPES = {TensorProto.INT8: "INT8", TensorProto.FLOAT8E4M3FN: "FLOAT8E4M3FN"}
SCALE_TYPES = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16"}
GEMM_OPS = ("MatMul", "Gemm")
# Ops that only move data: TensorRT propagates Q/DQ across them, so a DQ behind one still quantizes a GEMM input.
_DATA_MOVEMENT = ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity")
# Parser range of every TensorRT this project targets: onnx-tensorrt docs/operators.md, "TensorRT 10.0 supports
# operators in the inclusive range of opset 9 to opset 20" (10.15: 9..24); TensorRT 11.x "ONNX Opset Guide",
# "Supported ONNX and Opset Versions": minimum 9, maximum 25. A graph inside 9..20 parses on all of them.
MIN_OPSET, MAX_OPSET = 9, 20
# QuantizeLinear/DequantizeLinear-19 (ONNX operator spec) added FLOAT8 types and float16/bfloat16 scales.
OPSET_FP8_AND_HALF_SCALES = 19


@dataclass(frozen=True)
class Violation:
    """One broken rule.

    Attributes:
        rule: a key of `RULES`.
        node: the node (or tensor / model part) where it is broken.
        message: what is wrong and what to change.
    """

    rule: str
    node: str
    message: str

    def line(self, file: str | Path) -> str:
        """The CLI's one-line form: `file: rule: node: what to change`."""
        return f"{file}: {self.rule}: {self.node}: {self.message}"


def check_tensorrt(model: onnx.ModelProto | str | Path) -> list[Violation]:
    """Checks an ONNX graph against TensorRT's explicit-quantization and strong-typing rules.

    Args:
        model: the loaded model or a path to an .onnx file.

    Returns:
        Every violation found, in rule order (empty when TensorRT should parse and build the graph as
        the Q/DQ placement intends).
    """
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    g = _Graph(model)
    out: list[Violation] = []
    for rule in (_rule_qdq_type, _rule_zero_point, _rule_scale, _rule_per_channel, _rule_pairs, _rule_gemm_inputs, _rule_opset):
        out += rule(g)
    out += g.inference_violations + _rule_strong_types(g)
    return out


def gemm_quantization(model: onnx.ModelProto | str | Path) -> dict[str, int]:
    """Counts GEMMs (MatMul / Gemm) by how many of their two inputs come from a DequantizeLinear.

    Args:
        model: the loaded model or a path to an .onnx file.

    Returns:
        {"gemms": all, "quantized": both inputs Q/DQ (TensorRT runs them in INT8/FP8),
        "half": exactly one input Q/DQ}.
    """
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    g = _Graph(model, infer=False)
    counts = {"gemms": 0, "quantized": 0, "half": 0}
    for node in g.nodes:
        if node.op_type in GEMM_OPS:
            n = sum(g.dq_behind(name) is not None for name in node.input[:2])
            counts["gemms"] += 1
            counts["quantized"] += n == 2
            counts["half"] += n == 1
    return counts


def has_quantized_gemm(model: onnx.ModelProto | str | Path) -> bool:
    """True when at least one GEMM reads two Q/DQ inputs (the graph runs some GEMM in INT8/FP8 on TensorRT)."""
    return gemm_quantization(model)["quantized"] > 0


def graph_precision(model: onnx.ModelProto | str | Path) -> str:
    """The precision a strongly typed TensorRT plan of this graph has, read from its types.

    Args:
        model: the loaded model or a path to an .onnx file.

    Returns:
        "fp8" / "int8" when its Q/DQ are FLOAT8E4M3FN / INT8 ("mixed" when both), else "fp16" when it has
        FLOAT16 initializers, Casts or tensors, else "fp32".
    """
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    g = _Graph(model, infer=False)
    quant = set()
    for n in _qdq(g):
        zp = n.input[2] if len(n.input) > 2 else ""
        t = g.elem.get(zp) if zp else g.elem.get(n.input[0] if n.op_type == "DequantizeLinear" else n.output[0])
        if t in QUANT_TYPES:
            quant.add(t)
    if len(quant) > 1:
        return "mixed"
    if quant:
        return "fp8" if TensorProto.FLOAT8E4M3FN in quant else "int8"
    half = any(t == TensorProto.FLOAT16 for t in g.elem.values()) or any(
        n.op_type == "Cast" and _attr(n, "to") == TensorProto.FLOAT16 for n in g.nodes
    )
    return "fp16" if half else "fp32"


class _Graph:
    """Index of the main graph: producers, consumers, constants, element types (after strict inference)."""

    def __init__(self, model: onnx.ModelProto, infer: bool = True):
        self.model = model
        self.inference_violations: list[Violation] = []
        if infer:
            # Strongly Typed Networks (TensorRT "Precision Control" > "Strongly Typed Networks"): TensorRT takes every
            # tensor's type from the graph by type inference, so the graph must type-check strictly, as ONNX defines it.
            try:
                model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=False)
            except Exception as exc:  # InferenceError / ValidationError: the message names the node
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                self.inference_violations.append(
                    Violation(
                        "strong-types",
                        _node_in_message(first),
                        f"ONNX strict type inference fails ({first[:300]}); make operand types agree (insert a Cast) so TensorRT can type the network",
                    )
                )
        graph = model.graph
        self.graph = graph
        self.nodes = list(graph.node)
        self.producer = {o: n for n in self.nodes for o in n.output if o}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.nodes:
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        self.const: dict[str, TensorProto] = {t.name: t for t in graph.initializer}
        for n in self.nodes:
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                        self.const[n.output[0]] = a.t
        self.elem: dict[str, int] = {}
        self.declared: list[tuple[str, str, int]] = []  # (where, tensor, elem type) for the UINT8 scan
        for where, vis in (("graph input", graph.input), ("graph output", graph.output), ("value_info", graph.value_info)):
            for vi in vis:
                if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                    self.elem[vi.name] = vi.type.tensor_type.elem_type
                    self.declared.append((where, vi.name, vi.type.tensor_type.elem_type))
        for name, t in self.const.items():
            self.elem[name] = t.data_type
        self.graph_outputs = {o.name for o in graph.output}

    def name(self, node: onnx.NodeProto) -> str:
        return node.name or f"{node.op_type}({node.output[0] if node.output else '?'})"

    def is_const(self, tensor: str) -> bool:
        return tensor in self.const

    def array(self, tensor: str) -> np.ndarray:
        return numpy_helper.to_array(self.const[tensor])

    def dq_behind(self, tensor: str) -> onnx.NodeProto | None:
        """The DequantizeLinear that produces `tensor`, looking through data-movement ops."""
        node = self.producer.get(tensor)
        while node is not None and node.op_type in _DATA_MOVEMENT:
            node = self.producer.get(node.input[0])
        return node if node is not None and node.op_type == "DequantizeLinear" else None


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _qdq(g: _Graph) -> Iterable[onnx.NodeProto]:
    return (n for n in g.nodes if n.op_type in ("QuantizeLinear", "DequantizeLinear"))


def _type_name(t: int) -> str:
    return TensorProto.DataType.Name(t) if t else "unknown"


def _node_in_message(msg: str) -> str:
    # onnx's InferenceError reads "(op_type:MatMul, node name: mm): [TypeInferenceError] ..."
    if "node name:" in msg:
        return msg.split("node name:", 1)[1].split(")", 1)[0].strip() or "model"
    return "model"


# (a) qdq-type. Source: TensorRT "Working with Quantized Types" > "Introduction to Quantization": the quantized types
# are INT8 (signed), INT4, FP8E4M3, FP4E2M1 (symmetric scheme); onnx-tensorrt docs/operators.md: "INT8, INT4, FP8 and
# FP4 are treated as Quantized Types ... Note: UINT8 is only supported as network input or output tensor types", and
# tensorrt.DataType.UINT8 "cannot be used to represent quantized floating-point values" (UINT8 Q/DQ is DLA-only).
# Our graphs' I/O are int64 ids and float logits, so a UINT8 anywhere (even I/O) is a defect of the export.
def _rule_qdq_type(g: _Graph) -> list[Violation]:
    out: list[Violation] = []
    seen: set[str] = set()

    def uint8(tensor: str, where: str) -> None:
        if tensor not in seen:
            seen.add(tensor)
            out.append(
                Violation(
                    "qdq-type",
                    tensor,
                    f"UINT8 {where}; TensorRT's GPU path has no UINT8 quantized type: quantize signed (INT8, zero point int8 0, scale amax/127)",
                )
            )

    for t in g.graph.initializer:
        if t.data_type == TensorProto.UINT8:
            uint8(t.name, "initializer")
    for n in g.nodes:
        if n.op_type == "Constant" and n.output[0] in g.const and g.const[n.output[0]].data_type == TensorProto.UINT8:
            uint8(n.output[0], f"Constant {g.name(n)}")
        if n.op_type in ("Cast", "CastLike") and _attr(n, "to") == TensorProto.UINT8:
            out.append(Violation("qdq-type", g.name(n), "Cast to UINT8; cast to INT8 via a signed Q/DQ or keep the float type"))
    for where, tensor, t in g.declared:
        if t == TensorProto.UINT8:
            uint8(tensor, where)
    for n in _qdq(g):
        # The quantized side: DQ input / Q output, typed by the zero point (or output_dtype, opset 21).
        q_tensor = n.output[0] if n.op_type == "QuantizeLinear" else n.input[0]
        t = g.elem.get(q_tensor) or (g.elem.get(n.input[2]) if len(n.input) > 2 and n.input[2] else 0)
        if t == TensorProto.UINT8:
            uint8(q_tensor, f"{n.op_type} {g.name(n)} quantized tensor")
        elif t and t not in QUANT_TYPES:
            out.append(
                Violation(
                    "qdq-type",
                    g.name(n),
                    f"quantized type {_type_name(t)}; TensorRT 8-bit Q/DQ takes INT8 or FLOAT8E4M3FN only",
                )
            )
    return out


# (b) zero-point. Source: onnx-tensorrt docs/operators.md rows QuantizeLinear ("`y_zero_point` must be 0") and
# DequantizeLinear ("`x_zero_point` must be zero"); TensorRT operator reference "Quantize": "The zero_point must only
# contain zero-valued coefficients ... and must have the same shape as scale". ONNX QuantizeLinear: without a zero
# point the output type defaults to UINT8, so "absent" is not "zero" here.
def _rule_zero_point(g: _Graph) -> list[Violation]:
    out: list[Violation] = []
    for n in _qdq(g):
        name = g.name(n)
        zp = n.input[2] if len(n.input) > 2 else ""
        if not zp:
            out.append(
                Violation(
                    "zero-point",
                    name,
                    "no zero point: ONNX then makes the quantized tensor UINT8; add a zero point 0 of type INT8 (FLOAT8E4M3FN for FP8)",
                )
            )
            continue
        if not g.is_const(zp):
            out.append(
                Violation(
                    "zero-point", name, f"zero point {zp} is computed; make it an initializer (TensorRT needs a build-time constant 0)"
                )
            )
            continue
        t = g.const[zp].data_type
        if t not in QUANT_TYPES:
            out.append(Violation("zero-point", name, f"zero point type {_type_name(t)}; use INT8 (or FLOAT8E4M3FN) 0"))
            continue
        values = g.array(zp).astype(np.float32)
        if np.any(values != 0):
            out.append(
                Violation("zero-point", name, "zero point is not 0 (TensorRT quantizes symmetrically); fold the offset away and store 0")
            )
        scale = n.input[1]
        if g.is_const(scale) and tuple(g.const[scale].dims) != tuple(g.const[zp].dims):
            out.append(
                Violation(
                    "zero-point",
                    name,
                    f"zero point shape {list(g.const[zp].dims)} != scale shape {list(g.const[scale].dims)}; give them the same shape",
                )
            )
    return out


# (c) scale. Source: TensorRT operator reference "Quantize" / "Dequantize": "The scale tensor must be a build-time
# constant", scale type T1 in {float16, bfloat16, float32}; onnx-tensorrt operators.md QuantizeLinear supported types
# FP32, FP16, BF16. A zero, negative or non-finite scale has no meaning in TensorRT's symmetric scheme ("Working with
# Quantized Types" > "Introduction to Quantization": x_q = round(clamp(x / s)), x = x_q * s).
def _rule_scale(g: _Graph) -> list[Violation]:
    out: list[Violation] = []
    for n in _qdq(g):
        name, scale = g.name(n), n.input[1]
        if not g.is_const(scale):
            out.append(
                Violation(
                    "scale",
                    name,
                    f"scale {scale} is computed at run time; store it as an initializer (TensorRT needs a build-time constant)",
                )
            )
            continue
        t = g.const[scale].data_type
        if t not in SCALE_TYPES:
            out.append(Violation("scale", name, f"scale type {_type_name(t)}; use float32, float16 or bfloat16"))
            continue
        values = g.array(scale).astype(np.float32)
        if not np.all(np.isfinite(values)):
            out.append(
                Violation(
                    "scale", name, "scale has inf/NaN (an amax overflowed the scale type?); recompute amax or keep the scale in float32"
                )
            )
        elif np.any(values <= 0):
            out.append(
                Violation(
                    "scale",
                    name,
                    f"scale has {int(np.sum(values <= 0))} value(s) <= 0; scales must be > 0 (clamp amax to a small positive floor)",
                )
            )
    return out


# (d) per-channel. Source: TensorRT "Working with Quantized Types" > "Quantization Workflows" / "Explicit Quantization":
# per-tensor or per-channel scaling depending on the layer — INT8/FP8 activations per-tensor, weights per-channel along
# the output-channel axis (K of a convolution, N of a [K, N] GEMM operand); TensorRT operator reference "Quantize":
# the scale is "a scalar for per-tensor quantization, a 1-D tensor for per-channel quantization, or a 2-D tensor for
# block quantization (supported for DataType::kINT4 only)".
def _rule_per_channel(g: _Graph) -> list[Violation]:
    out: list[Violation] = []
    for n in _qdq(g):
        name, scale = g.name(n), n.input[1]
        block = _attr(n, "block_size", 0)
        if block:
            out.append(
                Violation("per-channel", name, f"block_size={block}: TensorRT block-quantizes INT4/FP4 only; use per-channel (axis) scales")
            )
        if not g.is_const(scale):
            continue
        dims = list(g.const[scale].dims)
        if len(dims) > 1:
            out.append(Violation("per-channel", name, f"scale of rank {len(dims)}: a scalar (per-tensor) or 1-D (per-channel) scale only"))
            continue
        if not dims or dims[0] == 1:
            continue  # per-tensor
        weight = _weight_of(g, n)
        if weight is None:
            out.append(
                Violation(
                    "per-channel",
                    name,
                    f"per-channel scale ({dims[0]} values) on an activation; TensorRT quantizes activations per-tensor: use one scale",
                )
            )
            continue
        rank = len(g.const[weight].dims)
        if _attr(n, "axis") is None:
            # ONNX reads a missing axis as 1; TensorRT's parser reads it as 0 for a per-channel scale (onnx-tensorrt
            # QuantDequantLinearHelper: axis defaults to the input's rank, which per-channel quantization maps to 0).
            # On a square weight both fit, and one of them applies every scale to the wrong channel, silently.
            expected = _output_channel_axis(g, _dq_output(g, n), 1) if _dq_output(g, n) else None
            where = f"axis={expected}" if isinstance(expected, int) else "the output-channel axis"
            out.append(
                Violation(
                    "per-channel",
                    name,
                    f"per-channel scale ({dims[0]} values) without an explicit axis: ONNX reads it as axis 1, TensorRT's parser "
                    f"as axis 0; write {where} explicitly",
                )
            )
            continue
        axis = _attr(n, "axis", 1)
        axis = axis + rank if axis < 0 else axis
        if axis >= rank or g.const[weight].dims[axis] != dims[0]:
            out.append(
                Violation(
                    "per-channel",
                    name,
                    f"scale length {dims[0]} does not match axis {axis} of weight {weight} {list(g.const[weight].dims)}",
                )
            )
            continue
        dq_out = _dq_output(g, n)
        if dq_out is None:
            continue  # reported by qdq-pairs
        expected = _output_channel_axis(g, dq_out, axis)
        if isinstance(expected, str):
            out.append(Violation("per-channel", name, expected))
        elif expected != axis:
            out.append(
                Violation(
                    "per-channel",
                    name,
                    f"per-channel axis {axis} is not the output-channel axis of the GEMM that reads {weight} (axis {expected}); quantize along axis {expected}",
                )
            )
    return out


def _dq_output(g: _Graph, n: onnx.NodeProto) -> str | None:
    """The dequantized tensor of a weight's Q/DQ: a DQ's own output, or the output of the DQ after a Q."""
    if n.op_type == "DequantizeLinear":
        return n.output[0]
    dq = next(iter(c for c in g.consumers.get(n.output[0], []) if c.op_type == "DequantizeLinear"), None)
    return dq.output[0] if dq is not None else None


def _weight_of(g: _Graph, n: onnx.NodeProto) -> str | None:
    """The constant weight a Q/DQ quantizes (DQ of an INT8 initializer, or Q of a float initializer), else None."""
    x = n.input[0]
    if g.is_const(x):
        return x
    if n.op_type == "DequantizeLinear":
        q = g.producer.get(x)
        if q is not None and q.op_type == "QuantizeLinear" and g.is_const(q.input[0]):
            return q.input[0]
    return None


def _output_channel_axis(g: _Graph, tensor: str, axis: int) -> int | str:
    """Where `axis` of `tensor` must lie for it to be the output-channel axis of the GEMM that consumes it.

    Follows Transposes (which move the axis) to the MatMul/Gemm; returns the expected axis in `tensor`'s own
    numbering, or a message when the weight feeds something that is not a GEMM.
    """
    perms: list[list[int]] = []
    node = None
    cur = tensor
    while True:
        consumers = g.consumers.get(cur, [])
        if len(consumers) != 1:
            return f"per-channel weight {tensor} has {len(consumers)} consumers; quantize it per-tensor or give each GEMM its own DQ"
        node = consumers[0]
        if node.op_type != "Transpose":
            break
        perms.append(list(_attr(node, "perm")))
        cur = node.output[0]
    if node.op_type not in GEMM_OPS + ("Conv",):
        return f"per-channel weight {tensor} feeds {node.op_type} {g.name(node)}, not a GEMM; quantize it per-tensor"
    idx = list(node.input).index(cur)
    rank = len(g.const[_const_root(g, tensor)].dims)
    if node.op_type == "Conv":
        target = 0  # W [K, C, R, S]: K is the output channel
    elif node.op_type == "Gemm":
        trans = _attr(node, "transB" if idx == 1 else "transA", 0)
        # B [K, N] -> N (axis 1), B^T [N, K] -> axis 0; A [M, K] -> M (axis 0), A^T -> axis 1.
        target = (0 if trans else 1) if idx == 1 else (1 if trans else 0)
    else:
        # MatMul: B [..., K, N] -> N is the last axis; A [..., M, K] -> M is the second-to-last.
        target = rank - 1 if idx == 1 else rank - 2
    # Walk the target axis back through the Transposes: output axis j of Transpose(perm) is input axis perm[j].
    for perm in reversed(perms):
        target = perm[target]
    return target


def _const_root(g: _Graph, tensor: str) -> str:
    """The initializer behind a DQ output (for its rank)."""
    dq = g.producer[tensor]
    return _weight_of(g, dq) or dq.input[0]


# (e) qdq-pairs. Source: TensorRT "Working with Quantized Types" > "Explicit Quantization" (Q/DQ layers are processed as
# Q -> DQ pairs that TensorRT fuses into the quantized layer) and "Q/DQ Layer-Placement Recommendations" ("quantize all
# inputs of weighted operations"). A Q whose output reaches a non-DQ node, or an activation DQ without a Q, leaves a
# bare int8/fp8 tensor in a float op, which TensorRT refuses to type (strongly typed) or cannot fuse.
def _rule_pairs(g: _Graph) -> list[Violation]:
    out: list[Violation] = []
    for n in g.nodes:
        name = g.name(n)
        if n.op_type == "QuantizeLinear":
            bad = [c for c in g.consumers.get(n.output[0], []) if c.op_type != "DequantizeLinear"]
            if bad:
                out.append(
                    Violation(
                        "qdq-pairs",
                        name,
                        f"feeds {', '.join(c.op_type + ' ' + g.name(c) for c in bad)}; a QuantizeLinear may feed only DequantizeLinear",
                    )
                )
            if n.output[0] in g.graph_outputs:
                out.append(
                    Violation(
                        "qdq-pairs", name, "its quantized output is a graph output; end the graph in float (add the DequantizeLinear)"
                    )
                )
            if not g.consumers.get(n.output[0]) and n.output[0] not in g.graph_outputs:
                out.append(Violation("qdq-pairs", name, "QuantizeLinear with no DequantizeLinear after it; remove it or pair it"))
        elif n.op_type == "DequantizeLinear" and not g.is_const(n.input[0]):
            src = g.producer.get(n.input[0])
            if src is None or src.op_type != "QuantizeLinear":
                what = "a graph input" if src is None else f"{src.op_type} {g.name(src)}"
                out.append(
                    Violation(
                        "qdq-pairs",
                        name,
                        f"activation DequantizeLinear reads {what}, not a QuantizeLinear; put the matching QuantizeLinear before it",
                    )
                )
    return out


# (e') gemm-inputs. Source: TensorRT "Q/DQ Layer-Placement Recommendations": quantize all inputs of weighted operations
# (Convolution, Deconvolution, GEMM); TensorRT fuses DQ -> GEMM into an INT8/FP8 kernel only when both operands are
# quantized, otherwise the GEMM runs in float and its single DQ is wasted work.
def _rule_gemm_inputs(g: _Graph) -> list[Violation]:
    out: list[Violation] = []
    for n in g.nodes:
        if n.op_type in GEMM_OPS:
            q = [g.dq_behind(i) is not None for i in n.input[:2]]
            if sum(q) == 1:
                plain = n.input[q.index(False)]
                out.append(
                    Violation(
                        "gemm-inputs",
                        g.name(n),
                        f"only one input is Q/DQ (input {plain} is not); TensorRT runs this GEMM in float: quantize {plain} too or drop the other Q/DQ",
                    )
                )
    return out


# (f) opset. Sources: TensorRT 11.x "ONNX Opset Guide" > "Supported ONNX and Opset Versions" (opset 9..25);
# onnx-tensorrt docs/operators.md for 10.0 ("opset 9 to opset 20") and later 10.x (up to 24); ONNX
# QuantizeLinear/DequantizeLinear-19 introduced FLOAT8 types and float16/bfloat16 scales.
def _rule_opset(g: _Graph) -> list[Violation]:
    out: list[Violation] = []
    version = next((o.version for o in g.model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if not MIN_OPSET <= version <= MAX_OPSET:
        out.append(
            Violation(
                "opset",
                "model",
                f"opset {version}; export with an opset in {MIN_OPSET}..{MAX_OPSET} (parsed by TensorRT 10.0 through 11.x; 19 for FP8/FP16 scales)",
            )
        )
    needs_19 = []
    for n in _qdq(g):
        zp = n.input[2] if len(n.input) > 2 else ""
        if (zp and g.elem.get(zp) == TensorProto.FLOAT8E4M3FN) or (
            g.is_const(n.input[1]) and g.const[n.input[1]].data_type != TensorProto.FLOAT
        ):
            needs_19.append(g.name(n))
    if needs_19 and version < OPSET_FP8_AND_HALF_SCALES:
        out.append(
            Violation(
                "opset",
                needs_19[0],
                f"opset {version} but {len(needs_19)} Q/DQ use FP8 or a float16/bfloat16 scale, which ONNX defines from opset 19; export with opset 19",
            )
        )
    for n in g.nodes:
        if n.domain not in ("", "ai.onnx"):
            out.append(
                Violation(
                    "opset", g.name(n), f"op {n.domain}.{n.op_type} is not a standard ONNX op; TensorRT's parser needs a plugin for it"
                )
            )
    return out


# (g) strong-types. Source: TensorRT "Precision Control" > "Strongly Typed Networks" (11.x: the only mode; every
# tensor's type follows type inference from the inputs and operator annotations) and the ONNX operator specs
# (QuantizeLinear-19: x and y_scale share T1; DequantizeLinear-19: y has the scale's type; MatMul/Add/Mul: both inputs T).
# Strict inference (in _Graph) already refuses most mismatches; these checks name the node and the fix precisely even
# when a graph carries value_info that inference cannot contradict.
def _rule_strong_types(g: _Graph) -> list[Violation]:
    out: list[Violation] = []
    for n in g.nodes:
        name = g.name(n)
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            st = g.elem.get(n.input[1])
            other = n.input[0] if n.op_type == "QuantizeLinear" else n.output[0]
            ot = g.elem.get(other)
            if st and ot and st != ot:
                side = "input" if n.op_type == "QuantizeLinear" else "output"
                out.append(
                    Violation(
                        "strong-types",
                        name,
                        f"{side} type {_type_name(ot)} != scale type {_type_name(st)}; store the scale as {_type_name(ot)} or Cast the {side}",
                    )
                )
        elif n.op_type in ("MatMul", "Add", "Mul", "Sub", "Div", "Gemm"):
            types = [g.elem.get(i) for i in n.input[: 3 if n.op_type == "Gemm" else 2] if i]
            known = [t for t in types if t]
            if len(set(known)) > 1:
                out.append(
                    Violation(
                        "strong-types",
                        name,
                        f"operand types {[_type_name(t) for t in known]} differ; a strongly typed network does not promote: insert a Cast",
                    )
                )
    return out
