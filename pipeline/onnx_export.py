"""ONNX export of the FP32 and Q/DQ models, and the post-export weight folding.

The legacy TorchScript exporter (dynamo=False) is used: it maps torch.fake_quantize_per_{tensor,
channel}_affine straight to QuantizeLinear/DequantizeLinear. The dynamo exporter needs Meta kernels
for those ops under dynamic shapes and emits Q/DQ pairs shared by several consumers, which blocks
ONNX Runtime's int8 fusion unless every pair is duplicated (README, "Export").
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from pipeline.outputs import atomic_write
from pipeline.quantization.tensor_quantizer import TensorQuantizer

log = logging.getLogger(__name__)
INPUT_ORDER = ("input_ids", "attention_mask", "token_type_ids")


class _Logits(torch.nn.Module):
    """Positional inputs -> logits tensor (the exporter wants a plain tensor output)."""

    def __init__(self, model: torch.nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.names, args))).logits


def graph_output(model: torch.nn.Module) -> tuple[str, dict[int, str]]:
    """(name, dynamic axes) of the exported graph's one output: the model's `graph_output` when it
    declares one (task wrappers), else classification logits."""
    return getattr(model, "graph_output", ("logits", {0: "batch"}))


@contextlib.contextmanager
def constant_scales(model: torch.nn.Module):
    """During export, quantizer scales are traced as constants (not Div/Clip over the amax buffer),
    so weight QuantizeLinear nodes can be folded into int8 initializers."""
    qs = [m for m in model.modules() if isinstance(m, TensorQuantizer)]
    for q in qs:
        q.export_constant_scale = True
    try:
        yield
    finally:
        for q in qs:
            q.export_constant_scale = False


def export(model: torch.nn.Module, example: dict[str, torch.Tensor], path: Path, opset: int) -> Path:
    """Export `model` (eval mode, CPU) with dynamic batch and sequence axes to `path` (atomic)."""
    names = [n for n in INPUT_ORDER if n in example]
    args = tuple(example[n].cpu() for n in names)
    wrapper = _Logits(model, names).eval()
    # The task's output (pipeline/tasks/): a model may declare its graph output's name and dynamic axes,
    # e.g. ("sentence_embedding", {0: "batch"}); classifiers output `logits` (batch, num_labels).
    output, output_axes = graph_output(model)
    axes = {n: {0: "batch", 1: "sequence"} for n in names} | {output: output_axes}

    def write(tmp: Path) -> None:
        # Record the exporter's warnings (not hide them): each is logged once per run folder, with a count.
        with warnings.catch_warnings(record=True) as caught, constant_scales(model), torch.no_grad():
            warnings.simplefilter("always")
            torch.onnx.export(
                wrapper,
                args,
                str(tmp),
                dynamo=False,
                opset_version=opset,
                input_names=names,
                output_names=[output],
                dynamic_axes=axes,
                do_constant_folding=True,
            )
        _log_export_warnings(caught, path)
        m = onnx.load(str(tmp))
        onnx.checker.check_model(m)

    return atomic_write(path, write)


# Exporter warnings understood and expected, each with why (logged at INFO); any other is a WARNING.
EXPECTED_EXPORT_WARNINGS = [
    # The legacy exporter is chosen on purpose (module docstring): it maps fake-quant ops to Q/DQ.
    (DeprecationWarning, r"legacy TorchScript-based ONNX export"),
    # constant_scales() turns each quantizer's amax into a constant while tracing: constants by design.
    (torch.jit.TracerWarning, r"Converting a tensor to a NumPy array|torch\.tensor results are registered as constants"),
]
_LOGGED: set[tuple] = set()  # (run folder, category, message, location) already logged


def _log_export_warnings(caught: list[warnings.WarningMessage], path: Path) -> None:
    """One log line per distinct warning and source line (the tracer repeats its own per layer), once per
    run folder (the FP32 and INT8 exports raise the same ones)."""
    counts: dict[tuple, int] = {}
    for w in caught:
        key = (str(Path(path).parent), w.category, str(w.message), f"{Path(w.filename).name}:{w.lineno}")
        counts[key] = counts.get(key, 0) + 1
    for key, n in counts.items():
        if key in _LOGGED:
            continue
        _LOGGED.add(key)
        _, category, message, where = key
        expected = any(issubclass(category, c) and re.search(rx, message) for c, rx in EXPECTED_EXPORT_WARNINGS)
        level = logging.INFO if expected else logging.WARNING
        log.log(level, "export %s: %s x%d at %s: %s", Path(path).name, category.__name__, n, where, message)


def constant_tensors(g: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Every constant of a graph by tensor name: initializers and Constant nodes' values (the protos
    themselves, so a pass can rewrite them in place)."""
    out = {n.output[0]: n.attribute[0].t for n in g.node if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    return out | {t.name: t for t in g.initializer}


def inferred_types(m: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor ONNX shape inference can type, initializers included."""
    g = onnx.shape_inference.infer_shapes(m).graph
    return {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]} | {
        t.name: t.data_type for t in g.initializer
    }


def fold_weight_quantization(m: onnx.ModelProto) -> int:
    """Replace QuantizeLinear(FP32 initializer) with the int8 (or FP8) initializer it computes, in place.

    The result is the deployable form: 8-bit weights + DequantizeLinear (4x smaller), identical
    numerics (ONNX QuantizeLinear: round half to even and saturate for int8; saturate to +-448 and
    round to nearest even for FP8 E4M3). Returns the number folded.
    """
    g = m.graph
    _fold_constant_clamps(g)
    inits = {i.name for i in g.initializer}
    consts = constant_tensors(g)

    def value(name: str):
        return numpy_helper.to_array(consts[name]) if name in consts else None

    folded, keep = 0, []
    for node in g.node:
        if node.op_type == "QuantizeLinear" and node.input[0] in inits:
            w, scale = value(node.input[0]), value(node.input[1])
            zp = value(node.input[2]) if len(node.input) > 2 else np.zeros((), np.uint8)
            if scale is not None and zp is not None:
                axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
                shape = [1] * w.ndim
                if scale.ndim == 1:
                    shape[axis] = -1
                q = _quantize(w, scale.reshape(shape), zp)
                g.initializer.append(numpy_helper.from_array(q, name=node.output[0]))
                folded += 1
                continue
        keep.append(node)
    del g.node[:]
    g.node.extend(keep)
    used = {i for n in g.node for i in n.input}
    live = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(live)
    return folded


def _fold_constant_clamps(g: onnx.GraphProto) -> None:
    """Min / Max of constants -> an initializer: the clamp a reduced-range (7-bit) weight quantizer
    puts on its weight before the 8-bit Q/DQ the exporter can write (TensorQuantizer.forward)."""
    values = {name: numpy_helper.to_array(t) for name, t in constant_tensors(g).items()}
    keep = []
    for n in g.node:
        if n.op_type in ("Min", "Max") and all(i in values for i in n.input):
            op = np.minimum if n.op_type == "Min" else np.maximum
            out = values[n.input[0]]
            for i in n.input[1:]:
                out = op(out, values[i])  # broadcasting, as ONNX Min / Max
            values[n.output[0]] = out
            g.initializer.append(numpy_helper.from_array(out.astype(values[n.input[0]].dtype), n.output[0]))
            continue
        keep.append(n)
    del g.node[:]
    g.node.extend(keep)


def _quantize(w: np.ndarray, scale: np.ndarray, zp: np.ndarray) -> np.ndarray:
    if zp.dtype.kind in "iu":
        info = np.iinfo(zp.dtype)
        return np.clip(np.rint(w / scale) + zp.reshape(scale.shape if zp.ndim else ()), info.min, info.max).astype(zp.dtype)
    # FP8 E4M3 (zero point 0 by definition): ml_dtypes' cast rounds to nearest even but turns
    # out-of-range values into NaN, so saturate first as QuantizeLinear (saturate=1) does.
    return np.clip(w / scale, -448.0, 448.0).astype(zp.dtype)


def rewrite(path: Path, *passes) -> list:
    """Apply in-place passes (ModelProto -> result) to the file at `path`; check and write it atomically."""
    m = onnx.load(str(path))
    results = [p(m) for p in passes]
    onnx.checker.check_model(m)
    atomic_write(path, lambda tmp: onnx.save(m, str(tmp)))
    return results


def dedicate_qdq(m: onnx.ModelProto) -> int:
    """Give every consumer of a shared Q -> DQ pair its own pair.

    Quantizers calibrated on the same tensor (e.g. the query/key/value inputs) get identical scales,
    and the exporter's common-subexpression pass merges their Q/DQ into one pair with three
    consumers. ONNX Runtime fuses Q -> DQ -> MatMul into an int8 kernel only for a dedicated pair
    (TensorRT likewise wants Q/DQ per GEMM input), so shared pairs are duplicated. Returns the number
    of pairs added. In place.
    """
    g = m.graph
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in g.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, i))

    consts = constant_tensors(g)

    def clone(node: onnx.NodeProto, suffix: str) -> onnx.NodeProto:
        """Copy a Q or DQ node with its own scale / zero-point initializers: ORT's common-
        subexpression elimination would merge copies that read the same tensors."""
        c = onnx.NodeProto()
        c.CopyFrom(node)
        c.name = f"{node.name or node.output[0]}{suffix}"
        c.output[0] = f"{node.output[0]}{suffix}"
        for slot in (1, 2):
            src = node.input[slot] if len(node.input) > slot else None
            tensor = consts.get(src) if src else None
            if tensor is not None:
                t = onnx.TensorProto()
                t.CopyFrom(tensor)
                t.name = f"{src}{suffix}_{c.name}"
                g.initializer.append(t)
                c.input[slot] = t.name
        return c

    added, out = 0, []
    for node in g.node:
        out.append(node)
        if node.op_type != "DequantizeLinear":
            continue
        users = consumers.get(node.output[0], [])
        q = producer.get(node.input[0])
        for k, (user, slot) in enumerate(users[1:], start=1):
            dq = clone(node, f"_dup{k}")
            if q is not None and q.op_type == "QuantizeLinear":
                q_copy = clone(q, f"_dup{k}")
                dq.input[0] = q_copy.output[0]
                out.append(q_copy)
            out.append(dq)
            user.input[slot] = dq.output[0]
            added += 1
    del g.node[:]
    g.node.extend(out)
    return added


def count_qdq(path: Path) -> dict[str, int]:
    nodes = onnx.load(str(path)).graph.node
    return {op: sum(n.op_type == op for n in nodes) for op in ("QuantizeLinear", "DequantizeLinear", "MatMul", "Gemm")}
