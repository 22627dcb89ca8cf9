"""The graphs TensorRT receives, written on any machine (no TensorRT needed).

TensorRT 11 networks are always strongly typed: precision comes from the graph, not from builder
flags. So the export writes, beside ONNX Runtime's graphs:

- `model_fp16.onnx`  the FP16 baseline: the FP32 graph converted to FP16 with onnxconverter-common
  (NVIDIA's migration guide uses ModelOpt AutoCast; its `[onnx]` extra would replace our onnx and
  onnxruntime with older builds and pull onnxruntime-gpu, cupy and polygraphy, so we use the light
  converter), I/O kept FP32/INT64, the ops in `FP32_OPS` kept in FP32.
- `model_int8_trt.onnx`  INT8 Q/DQ on every quantized GEMM input, FP16 everywhere else: DQ scales are
  FP16 constants, so DequantizeLinear outputs FP16 (ONNX DQ-19: output type = scale type) and
  QuantizeLinear reads FP16. Signed INT8 only: the softmax output P, quantized unsigned (0..255) for
  ONNX Runtime, becomes signed with scale amax/127 (values 0..127), because TensorRT's ONNX parser
  accepts signed INT8 / FP8 Q/DQ only (UINT8 is DLA-only).
- `model_fp8.onnx`  the same with FP8 E4M3 Q/DQ (scale amax/448), for Hopper and later.

Each is built from the *unfolded* Q/DQ export (FP32 weights + QuantizeLinear), so weights are
quantized once, from FP32, in the target format. Every graph is checked with
`pipeline.engines.trt_rules` before it is written (`qdq-pipeline-check` runs the same rules).
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper, version_converter

from pipeline.onnx_export import constant_tensors, dedicate_qdq, fold_weight_quantization, inferred_types
from pipeline.outputs import atomic_write

log = logging.getLogger(__name__)

# Q/DQ with FP16 scales (DequantizeLinear producing FP16) and FP8 types both need opset 19
# (ONNX QuantizeLinear-19 / DequantizeLinear-19); TensorRT 10/11's parser reads opset 19.
OPSET = 19

# Kept in FP32 in the FP16 graphs, each for a reason:
# - LayerNormalization: mean and variance over the hidden size of residual sums that reach hundreds
#   in BERT-family models (outlier features); the sum of squares overflows FP16's 65504. TensorRT
#   itself warns that FP16 LayerNorm "may cause overflow" and recommends FP32 for it.
# - Softmax: exp/sum over up to max_length keys with an additive padding mask; FP32 keeps the
#   normalizer exact (TensorRT's fused attention kernels also accumulate softmax in FP32).
# - ReduceMean / ReduceSum / Pow / Sqrt / Reciprocal: the pieces of a LayerNorm or RMSNorm that
#   some exporters decompose; same overflow argument.
# - onnxconverter-common's default block list (ops without FP16 definitions, e.g. Range, CumSum).
FP32_OPS = ("LayerNormalization", "Softmax", "ReduceMean", "ReduceSum", "ReduceSumSquare", "Pow", "Sqrt", "Reciprocal")

FP8_MAX = 448.0  # largest finite FLOAT8E4M3FN value: scale = amax / 448


def _block_list() -> list[str]:
    from onnxconverter_common import float16

    return sorted(set(FP32_OPS) | set(float16.DEFAULT_OP_BLOCK_LIST))


def position_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes that compute float values from shapes and constants only: positions, rotary angles
    (ModernBERT), relative-position buckets (DeBERTa, MPNet). Kept in FP32.

    Such values are integers cast to float and transformed (log buckets, position x frequency, sin /
    cos); in FP16 a position of 512 has a spacing of 0.5, which would wreck rotary angles. They do
    not depend on the input's values, only on its shape, so FP32 there costs nothing per token.
    Found by propagation: seeds are Casts to FLOAT of shape-derived integers; a node whose float
    inputs are such tensors or constants continues the region; anything touching the graph inputs'
    values (embeddings, the attention mask) ends it.
    """
    g = model.graph
    types = inferred_types(model)
    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE}
    value_dependent = {i.name for i in g.input}
    region: set[str] = set()  # float tensors inside the position region
    nodes = []
    for n in g.node:
        ins = [i for i in n.input if i]
        if n.op_type != "Shape" and any(i in value_dependent for i in ins):
            value_dependent.update(n.output)
            continue
        to = next((a.i for a in n.attribute if a.name == "to"), None)
        seed = n.op_type == "Cast" and to == TensorProto.FLOAT and types.get(n.input[0]) not in floats
        if seed or any(i in region for i in ins):
            nodes.append(n.name)
            region.update(o for o in n.output if types.get(o, TensorProto.FLOAT) in floats)
    return nodes


def _to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """FP32 -> FP16 except `FP32_OPS` and the position region; graph I/O keep their types (Casts inside)."""
    from onnxconverter_common import float16

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # max_finite_val: the additive attention mask holds float32's lowest value (-3.4e38); it
        # becomes -1e4, still "minus infinity" after softmax (exp(-1e4) == 0) without producing inf.
        out = float16.convert_float_to_float16(
            model,
            keep_io_types=True,
            op_block_list=_block_list(),
            node_block_list=position_nodes(model),
            min_positive_val=2.0**-24,
            max_finite_val=1e4,
        )
    # The converter retypes the output of a Cast from an integer type (e.g. the attention mask cast
    # to float) to FP16 but leaves `to=FLOAT`: make the Cast produce what its output is declared as.
    declared = {v.name: v.type.tensor_type.elem_type for v in out.graph.value_info}
    for n in out.graph.node:
        if n.op_type == "Cast" and declared.get(n.output[0]) == TensorProto.FLOAT16:
            for a in n.attribute:
                if a.name == "to" and a.i == TensorProto.FLOAT:
                    a.i = TensorProto.FLOAT16
    clipped = [w for w in caught if "truncated" in str(w.message)]
    if clipped:
        # Expected and harmless: the mask constant and a few weights below FP16's smallest subnormal.
        log.info("fp16 conversion: %d constants clipped to the FP16 range (the attention mask's -3.4e38 among them)", len(clipped))
    for w in caught:
        if "truncated" not in str(w.message):
            log.warning("fp16 conversion: %s", w.message)
    return out


def _upgrade(model: onnx.ModelProto) -> onnx.ModelProto:
    current = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    return model if current >= OPSET else version_converter.convert_version(model, OPSET)


def retype_qdq(model: onnx.ModelProto, fmt: str) -> dict[str, int]:
    """Turn every Q/DQ into signed INT8 (`fmt="int8"`) or FP8 E4M3 (`fmt="fp8"`), same amax.

    amax is recovered from each node's scale (scale * qmax of its current type: 127 for int8, 255 for
    uint8, max(z, 255 - z) for uint8 with zero point z: the asymmetric range's farther end) and the new
    scale is amax / 127 (int8) or amax / 448 (fp8); zero points become zeros of the target type. Q and DQ
    of a pair share their scale tensor, which is rewritten once.
    """
    g = model.graph
    consts = constant_tensors(g)
    done: dict[str, float] = {}
    counts: Counter[str] = Counter()
    for node in g.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3:
            continue
        zp = consts.get(node.input[2])
        scale = consts.get(node.input[1])
        if zp is None or scale is None:
            raise ValueError(f"{node.name}: Q/DQ scale and zero point must be constants to be converted")
        old = zp.data_type
        if old == TensorProto.UINT8:
            # Asymmetric (zero point z): the range [-z * s, (255 - z) * s] becomes the symmetric one that
            # holds both ends, amax = max(z, 255 - z) * s; z = 0 (softmax output) gives 255 * s.
            z = float(np.asarray(numpy_helper.to_array(zp), dtype=np.float64).max())
            qmax = max(z, 255.0 - z)
        elif old == TensorProto.INT8:
            qmax = 127.0
        elif old == TensorProto.FLOAT8E4M3FN:
            qmax = FP8_MAX
        else:
            raise ValueError(f"{node.name}: unsupported zero-point type {TensorProto.DataType.Name(old)}")
        new_max = FP8_MAX if fmt == "fp8" else 127.0
        factor = qmax / new_max
        if node.input[1] in done:
            if done[node.input[1]] != factor:
                raise ValueError(f"{node.name}: scale {node.input[1]} shared by Q/DQ of different types")
        else:
            s = numpy_helper.to_array(scale).astype(np.float32) * np.float32(factor)
            scale.CopyFrom(numpy_helper.from_array(s, scale.name))
            done[node.input[1]] = factor
        zeros = np.zeros(numpy_helper.to_array(zp).shape, dtype=_np_type(fmt))
        new_zp = numpy_helper.from_array(zeros, f"{node.input[2]}_{fmt}_{node.name}")
        g.initializer.append(new_zp)
        node.input[2] = new_zp.name
        counts[f"{TensorProto.DataType.Name(old).lower()}->{fmt}"] += 1
    # Recorded intermediate types (from the exporter / version converter) still say uint8 / float:
    # drop them so type inference derives the new ones.
    del g.value_info[:]
    _drop_unused(model)  # the replaced zero points
    return dict(counts)


def _np_type(fmt: str):
    if fmt == "fp8":
        import ml_dtypes  # installed with onnx

        return ml_dtypes.float8_e4m3fn
    return np.int8


def _drop_noop_casts(model: onnx.ModelProto) -> int:
    """Remove Casts to the type their input already has (e.g. softmax(dtype=float32).to(float32)).

    They are no-ops in FP32 but would pin an FP32 type in the middle of the FP16 graph: the converter
    retypes their output tensors to FP16 and leaves `to=FLOAT`, which breaks strong typing.
    """
    g = model.graph
    types = inferred_types(model)
    outputs = {o.name for o in g.output}
    rename: dict[str, str] = {}
    keep = []
    for n in g.node:
        to = next((a.i for a in n.attribute if a.name == "to"), None)
        if n.op_type == "Cast" and n.output[0] not in outputs and types.get(n.input[0]) == to:
            rename[n.output[0]] = rename.get(n.input[0], n.input[0])
            continue
        keep.append(n)
    for n in keep:
        for i, name in enumerate(n.input):
            if name in rename:
                n.input[i] = rename[name]
    del g.node[:]
    g.node.extend(keep)
    # Identity(initializer): the exporter's de-duplication of equal weights (e.g. LayerNorm
    # parameters of a freshly initialized model). onnxconverter-common converts such an initializer
    # only for some of its consumers when one of them is blocked (LayerNorm stays FP32), leaving an
    # FP32 -> FP16 Identity; giving each output its own copy of the constant avoids that.
    inits = {t.name: t for t in g.initializer}
    for n in [n for n in g.node if n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in outputs]:
        copy = onnx.TensorProto()
        copy.CopyFrom(inits[n.input[0]])
        copy.name = n.output[0]
        g.initializer.append(copy)
        g.node.remove(n)
    return len(rename)


def _drop_unused(model: onnx.ModelProto) -> None:
    """Initializers and Constant nodes nothing reads any more (e.g. the replaced uint8 zero points)."""
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    dead = [n for n in model.graph.node if n.op_type == "Constant" and n.output[0] not in used]
    for n in dead:
        model.graph.node.remove(n)
    live = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(live)


def fp16_graph(fp32_onnx: Path, out: Path) -> dict:
    """model_fp16.onnx: the FP16 baseline TensorRT builds (strongly typed)."""
    m = _upgrade(onnx.load(str(fp32_onnx)))
    _drop_noop_casts(m)
    m = _to_fp16(m)
    return _save(m, out, {"opset": OPSET, "fp32_ops": _fp32_ops(m)})


def quantized_graph(qdq_onnx: Path, out: Path, fmt: str) -> dict:
    """model_int8_trt.onnx (fmt="int8") or model_fp8.onnx (fmt="fp8") from the unfolded Q/DQ export."""
    m = _upgrade(onnx.load(str(qdq_onnx)))
    _drop_noop_casts(m)
    retyped = retype_qdq(m, fmt)
    folded = fold_weight_quantization(m)
    dedicated = dedicate_qdq(m)
    m = _to_fp16(m)
    return _save(m, out, {"opset": OPSET, "format": fmt, "retyped": retyped, "folded_weights": folded, "dedicated_qdq_pairs": dedicated})


def _fp32_ops(m: onnx.ModelProto) -> dict[str, int]:
    """Ops the FP16 graph keeps in FP32 (counted, for the report)."""
    return dict(Counter(n.op_type for n in m.graph.node if n.op_type in FP32_OPS))


def _save(m: onnx.ModelProto, out: Path, info: dict) -> dict:
    from pipeline.engines import trt_rules

    onnx.checker.check_model(m, full_check=True)
    violations = trt_rules.check_tensorrt(m)
    if violations:
        lines = "\n".join(f"  {v.line(out.name)}" for v in violations[:20])
        raise ValueError(f"{out.name} breaks TensorRT's explicit-quantization rules ({len(violations)}):\n{lines}")
    atomic_write(out, lambda tmp: onnx.save(m, str(tmp)))
    info["tensorrt_check"] = "ok"
    log.info("export: %s %s", out.name, info)
    return info
