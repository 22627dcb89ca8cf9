"""TensorRT's graphs, built and checked on any machine: FP16 baseline, signed-INT8 graph, FP8 graph.

TensorRT cannot run here; what it would receive can: the graphs are checked statically against its
rules and executed by ONNX Runtime (CPU), which runs FP16 graphs and FP8 Q/DQ.
"""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from pipeline.engines import trt_graphs, trt_rules
from pipeline.quantization.tensor_quantizer import TensorQuantizer
from pipeline.stages.export import tensorrt_graphs_wanted
from pipeline.stages.report import summary_table
from pipeline.testing import compose_cfg, run_tiny
from pipeline.validation import validate

TRT_FILES = ("model_fp16.onnx", "model_int8_trt.onnx")


def _types(m: onnx.ModelProto) -> set[int]:
    """Every element type a graph declares: initializers, Constant values, value_info, I/O, Cast targets."""
    g = m.graph
    out = {t.data_type for t in g.initializer}
    out |= {v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    for n in g.node:
        for a in n.attribute:
            if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                out.add(a.t.data_type)
            if n.op_type == "Cast" and a.name == "to":
                out.add(a.i)
    return out


def test_default_run_writes_legal_tensorrt_graphs_and_measures_them(tmp_path):
    ctx = run_tiny(tmp_path, ["benchmark=none"])
    run = tmp_path / "run"
    for f in TRT_FILES:
        m = onnx.load(str(run / f))
        assert trt_rules.check_tensorrt(m) == [], f
        assert TensorProto.UINT8 not in _types(onnx.shape_inference.infer_shapes(m)), f
        assert next(o.version for o in m.opset_import if o.domain == "") == trt_graphs.OPSET
    int8 = onnx.load(str(run / "model_int8_trt.onnx"))
    # Every quantized GEMM keeps both inputs quantized; DQ outputs FP16 (FP16 scales).
    assert trt_rules.gemm_quantization(int8)["half"] == 0
    dq_scales = {_const_type(int8, n.input[1]) for n in int8.graph.node if n.op_type == "DequantizeLinear"}
    assert dq_scales == {TensorProto.FLOAT16}
    # The ONNX Runtime graph keeps its unsigned P (fastest there); only TensorRT's graph is signed.
    assert TensorProto.UINT8 in _types(onnx.load(str(run / "model_int8.onnx")))
    acc = json.loads((run / "metrics.json").read_text())["accuracy"]
    assert acc["trt_graph_fp16"] is not None and acc["trt_graph_int8"] is not None
    assert abs(acc["trt_graph_fp16"] - acc["engine_fp32"]) <= 0.02  # FP16 graph == FP32 up to a near tie
    p = ctx.metrics.tensorrt_graphs["trt_graph_int8"]["parity_vs_fake_quant"]
    assert p["argmax_agreement"] >= 0.95 and p["cosine"] > 0.99, p
    # Ops ORT CPU computes in FP32 inside the FP16 graph (e.g. MatMul on x86 without FP16 GEMM
    # kernels) are reported, not hidden: real op types of the graph, each counted at least once.
    fallback = ctx.metrics.tensorrt_graphs["trt_graph_fp16"]["ort_cpu_fp32_fallback_ops"]
    ops = {n.op_type for n in onnx.load(str(run / "model_fp16.onnx")).graph.node}
    assert isinstance(fallback, dict) and set(fallback) <= ops and all(v > 0 for v in fallback.values()), fallback
    # FP16 logits vs FP32 logits on the same batch: FP16 rounding only.
    feed = {
        "input_ids": np.random.default_rng(0).integers(1000, 20000, (4, 24)),
        "attention_mask": np.ones((4, 24), np.int64),
        "token_type_ids": np.zeros((4, 24), np.int64),
    }
    a, b = ctx.check_engines["trt_graph_fp16"].run(feed), ctx.engines["fp32"].run(feed)
    assert a.dtype == np.float32 and np.abs(a - b).max() <= 1e-2 * max(np.abs(b).max(), 1e-3)


def _const_type(m: onnx.ModelProto, name: str) -> int:
    for t in m.graph.initializer:
        if t.name == name:
            return t.data_type
    for n in m.graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return n.attribute[0].t.data_type
    raise KeyError(name)


def _qdq_model(zp: np.ndarray, scale: float, opset: int = 19) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])
    inits = [numpy_helper.from_array(np.array(scale, np.float32), "s"), numpy_helper.from_array(zp, "z")]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q"),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
    ]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", opset)])


def _run(m: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_unsigned_softmax_pair_becomes_signed_with_the_same_amax():
    amax = 0.9
    m = _qdq_model(np.zeros((), np.uint8), amax / 255)
    assert trt_graphs.retype_qdq(m, "int8") == {"uint8->int8": 2}
    assert {_const_type(m, n.input[2]) for n in m.graph.node} == {TensorProto.INT8}
    scale = float(numpy_helper.to_array(m.graph.initializer[0]))
    assert scale == pytest.approx(amax / 127, rel=1e-6)
    x = np.random.default_rng(0).uniform(0, 1, (4, 8)).astype(np.float32)  # softmax outputs
    y = _run(m, x)
    q = np.round(x / scale).clip(0, 127)  # values 0..127: the signed range's positive half
    np.testing.assert_allclose(y, q * scale, rtol=1e-6)
    assert trt_rules.check_tensorrt(m) == []


@pytest.mark.parametrize("axis", [None, 0])
def test_fp8_fake_quant_equals_onnx_fp8_quantizelinear(axis):
    """Torch's FP8 fake quant (what QAT trains) is bit-identical to ONNX E4M3 Q/DQ (what engines run)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, generator=g) * 3
    x[0, 0] = 1e4  # saturates to +448 * scale, as QuantizeLinear(saturate=1)
    q = TensorQuantizer("linear_input", axis=axis, format="fp8")
    amax = x.abs().amax(dim=1) if axis == 0 else torch.tensor(2.0)
    q.load_amax(amax)
    ours = q(x).numpy()
    import ml_dtypes

    zp = np.zeros(amax.shape, ml_dtypes.float8_e4m3fn)
    scale = (amax / 448).numpy().astype(np.float32)
    m = _qdq_model(zp, 0.0)
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(scale, "s"))
    if axis is not None:
        for n in m.graph.node:
            n.attribute.append(helper.make_attribute("axis", axis))
    np.testing.assert_array_equal(ours, _run(m, x.numpy()))
    # Straight-through gradient inside the range, zero where it saturated.
    xg = x.clone().requires_grad_()
    q(xg).sum().backward()
    inside = x.abs() <= (amax[:, None] if axis == 0 else amax)
    assert 0 < inside.sum() < (x.numel() if axis is None else x.numel() + 1)
    torch.testing.assert_close(xg.grad, inside.float())


def test_fp8_run_measures_fp8_accuracy_and_does_not_time_an_emulated_engine(tmp_path):
    ctx = run_tiny(tmp_path, ["quant.format=fp8", "calibration=max"])
    run = tmp_path / "run"
    assert (run / "model_fp8.onnx").exists() and not (run / "model_int8.onnx").exists()
    m = onnx.load(str(run / "model_fp8.onnx"))
    assert trt_rules.check_tensorrt(m) == []
    zps = {_const_type(m, n.input[2]) for n in m.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")}
    assert zps == {TensorProto.FLOAT8E4M3FN}
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["accuracy"]["fp8"] is not None and metrics["accuracy"]["int8"] is None
    assert metrics["engine_precisions"] == {"baseline": "fp32", "quantized": "fp8"}
    assert metrics["benchmark"]["not_timed"] == ["fp8"] and metrics["speedup"] is None
    assert {r["precision"] for r in metrics["benchmark"]["grid"]} == {"fp32"}
    assert ctx.metrics.parity["argmax_agreement"] >= 0.95 and ctx.metrics.parity["cosine"] > 0.99, ctx.metrics.parity


def test_tensorrt_graphs_are_optional_except_for_the_tensorrt_engine():
    assert tensorrt_graphs_wanted(validate(compose_cfg([])))
    assert not tensorrt_graphs_wanted(validate(compose_cfg(["export.tensorrt_graphs=false"])))
    assert tensorrt_graphs_wanted(validate(compose_cfg(["export.tensorrt_graphs=false", "engine=tensorrt"])))


def test_fp8_with_learnable_amax_is_refused():
    from pipeline.schema import ConfigError

    with pytest.raises(ConfigError) as e:
        validate(compose_cfg(["quant.format=fp8", "qat.learn_amax=true"]))
    assert e.value.errors == ["qat.learn_amax: learnable amax is implemented for int8 only; quant.format=fp8 needs qat.learn_amax=false"]


def test_report_labels_the_tensorrt_baseline_fp16(tmp_path):
    d = {
        "accuracy": {"fp32": 0.9, "fake_quant": 0.89, "engine_fp32": None, "engine_fp16": 0.9, "int8": 0.885},
        "parity": {"argmax_agreement": 0.99, "cosine": 0.999},
        "latency_ms": {"fp16": {"p50": 2.0}, "int8": {"p50": 1.0}},
        "speedup": 2.0,
        "engine_precisions": {"baseline": "fp16", "quantized": "int8"},
        "benchmark": {"grid": [{"batch": 8, "seq": 128, "precision": "fp16", "p50": 2.0}]},
        "quantization": {},
    }
    table = summary_table(d, tmp_path)
    assert "accuracy engine FP16 " in table and "90.00 %" in table
    assert re.search(r"speedup \(FP16 p50 / INT8 p50\) +\| 2.00x", table), table
    assert "FP32 p50" not in table and "engine FP32" not in table


def test_position_region_stays_fp32_in_the_fp16_graph(tmp_path):
    """Rotary-style angles (position x frequency -> sin) come from the input's shape only: kept FP32,
    while the activation path they meet is FP16 (a position of 512 has an FP16 spacing of 0.5)."""
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", 4])
    inits = [
        numpy_helper.from_array(np.random.default_rng(0).standard_normal((100, 4)).astype(np.float32), "emb"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
        numpy_helper.from_array(np.array(0, np.int64), "zero_i"),
        numpy_helper.from_array(np.array(1, np.int64), "step"),
        numpy_helper.from_array(np.array([1.0, 0.1, 0.01, 0.001], np.float32), "inv_freq"),
    ]
    nodes = [
        helper.make_node("Shape", ["input_ids"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "one"], ["seq"], name="seq", axis=0),
        helper.make_node("Squeeze", ["seq"], ["seq_s"], name="squeeze"),
        helper.make_node("Range", ["zero_i", "seq_s", "step"], ["pos"], name="range"),
        helper.make_node("Cast", ["pos"], ["pos_f"], name="pos_cast", to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["pos_f", "one"], ["pos_col"], name="pos_col"),
        helper.make_node("Mul", ["pos_col", "inv_freq"], ["angles"], name="angles"),
        helper.make_node("Sin", ["angles"], ["sin"], name="sin"),
        helper.make_node("Gather", ["emb", "input_ids"], ["h"], name="embed"),
        helper.make_node("Mul", ["h", "sin"], ["logits"], name="rotate"),
    ]
    m = helper.make_model(helper.make_graph(nodes, "g", [ids], [out], inits), opset_imports=[helper.make_opsetid("", 19)])
    assert trt_graphs.position_nodes(m) == ["pos_cast", "pos_col", "angles", "sin"]
    onnx.save(m, str(tmp_path / "fp32.onnx"))
    trt_graphs.fp16_graph(tmp_path / "fp32.onnx", tmp_path / "fp16.onnx")  # also runs the TensorRT checker
    g = onnx.shape_inference.infer_shapes(onnx.load(str(tmp_path / "fp16.onnx"))).graph
    types = {v.name: v.type.tensor_type.elem_type for v in g.value_info}
    out_type = {n.name: types.get(n.output[0]) for n in g.node}  # the converter renames outputs it casts
    assert out_type["sin"] == out_type["angles"] == TensorProto.FLOAT  # kept FP32
    assert out_type["embed"] == TensorProto.FLOAT16  # the activation path is FP16
    x = np.array([[5, 17, 42] + [3] * 509], np.int64)  # positions up to 511
    ref = ort.InferenceSession(str(tmp_path / "fp32.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input_ids": x})[0]
    got = ort.InferenceSession(str(tmp_path / "fp16.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input_ids": x})[0]
    assert np.abs(got - ref).max() < 1e-2 * np.abs(ref).max()  # FP16 activations only; angles exact


def test_asymmetric_pair_becomes_symmetric_over_its_farther_end():
    """An asymmetric uint8 input (zero point 20, range [-20 s, 235 s]) keeps both ends in the signed graph."""
    s = 0.02
    m = _qdq_model(np.array(20, np.uint8), s)
    assert trt_graphs.retype_qdq(m, "int8") == {"uint8->int8": 2}
    scale = float(numpy_helper.to_array(m.graph.initializer[0]))
    assert scale == pytest.approx(235 * s / 127, rel=1e-6)
    x = np.linspace(-20 * s, 235 * s, 32, dtype=np.float32).reshape(4, 8)
    np.testing.assert_allclose(_run(m, x), np.round(x / scale) * scale, rtol=1e-6)
    assert float(np.abs(_run(m, x) - x).max()) <= scale / 2 + 1e-6
    assert trt_rules.check_tensorrt(m) == []
