"""TensorRT static checks: the explicit-quantization rules on small hand-built graphs (a legal INT8 and a legal
FP8 GEMM pattern pass; each planted violation is caught under its rule name), the `qdq-pipeline-check` CLI, and
a scan of the source tree for APIs TensorRT 11 removed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.check import main as check_main
from pipeline.engines.trt_rules import RULES, Violation, check_tensorrt, gemm_quantization, has_quantized_gemm

ROOT = Path(__file__).resolve().parent.parent
K, N, M = 8, 6, 4  # hidden K -> N (MatMul, B [K, N]) -> M (Transpose'd weight) -> M (Gemm, transB=1)
F16 = TensorProto.FLOAT16


def _qtype(fmt: str) -> int:
    return TensorProto.INT8 if fmt == "int8" else TensorProto.FLOAT8E4M3FN


def _const(name: str, dtype: int, dims: list[int], vals) -> TensorProto:
    return helper.make_tensor(
        name, dtype, dims, np.asarray(vals, dtype=np.float64).reshape(-1).tolist() if dtype != TensorProto.INT8 else vals
    )


def legal_model(fmt: str = "int8", opset: int = 19) -> onnx.ModelProto:
    """x [b, s, K] fp32 -> Cast fp16 -> Q/DQ -> MatMul(W1 [K, N] per-channel axis 1) -> Add bias
    -> Q/DQ -> MatMul(Transpose(W2 [M, N]) per-channel axis 0) -> Q/DQ -> Gemm(W3 [M, M], transB=1, axis 0)
    -> Cast fp32. Weights are stored quantized (INT8 / FP8 initializers -> DequantizeLinear), scales fp16,
    zero points 0 of the quantized type: the pattern the export writes for TensorRT."""
    qt = _qtype(fmt)
    qmax = 127.0 if fmt == "int8" else 448.0
    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def weight(name: str, dims: list[int], axis: int) -> str:
        w = rng.integers(-127, 128, size=dims) if fmt == "int8" else rng.uniform(-448, 448, size=dims)
        inits.append(_const(f"{name}_q", qt, dims, w.astype(np.int64 if fmt == "int8" else np.float64).reshape(-1).tolist()))
        inits.append(_const(f"{name}_scale", F16, [dims[axis]], rng.uniform(0.001, 0.01, dims[axis])))
        inits.append(_const(f"{name}_zp", qt, [dims[axis]], [0] * dims[axis]))
        nodes.append(
            helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_scale", f"{name}_zp"], [name], name=f"{name}_dq", axis=axis)
        )
        return name

    def act_qdq(x: str, tag: str, amax: float = 4.0) -> str:
        inits.append(_const(f"{tag}_scale", F16, [], [amax / qmax]))
        inits.append(_const(f"{tag}_zp", qt, [], [0]))
        nodes.append(helper.make_node("QuantizeLinear", [x, f"{tag}_scale", f"{tag}_zp"], [f"{tag}_q"], name=f"{tag}_q"))
        nodes.append(helper.make_node("DequantizeLinear", [f"{tag}_q", f"{tag}_scale", f"{tag}_zp"], [f"{tag}_dq"], name=f"{tag}_dq"))
        return f"{tag}_dq"

    nodes.append(helper.make_node("Cast", ["x"], ["x16"], name="cast_in", to=F16))
    w1 = weight("w1", [K, N], axis=1)
    nodes.append(helper.make_node("MatMul", [act_qdq("x16", "a1"), w1], ["h1"], name="mm1"))
    inits.append(_const("b1", F16, [N], np.zeros(N)))
    nodes.append(helper.make_node("Add", ["h1", "b1"], ["h1b"], name="add1"))
    w2 = weight("w2", [M, N], axis=0)  # stored [M, N]; the GEMM reads its transpose [N, M]: output channel M = axis 0 here
    nodes.append(helper.make_node("Transpose", [w2], ["w2t"], name="w2_t", perm=[1, 0]))
    nodes.append(helper.make_node("MatMul", [act_qdq("h1b", "a2"), "w2t"], ["h2"], name="mm2"))
    # Gemm takes 2-D operands: flatten (b, s, M) -> (b*s, M).
    inits.append(helper.make_tensor("shape2d", TensorProto.INT64, [2], [-1, M]))
    nodes.append(helper.make_node("Reshape", ["h2", "shape2d"], ["h2_2d"], name="flatten"))
    w3 = weight("w3", [M, M], axis=0)  # Gemm transB=1: B^T [N, K] -> the output channel is axis 0
    nodes.append(helper.make_node("Gemm", [act_qdq("h2_2d", "a3"), w3], ["h3"], name="gemm3", transB=1))
    nodes.append(helper.make_node("Cast", ["h3"], ["logits"], name="cast_out", to=TensorProto.FLOAT))
    graph = helper.make_graph(
        nodes,
        "legal",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", K])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, M])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    return model


def _init(m: onnx.ModelProto, name: str) -> TensorProto:
    return next(t for t in m.graph.initializer if t.name == name)


def _node(m: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in m.graph.node if n.name == name)


def _replace_init(m: onnx.ModelProto, t: TensorProto) -> None:
    old = _init(m, t.name)
    m.graph.initializer.remove(old)
    m.graph.initializer.append(t)


def rules(m: onnx.ModelProto) -> set[str]:
    return {v.rule for v in check_tensorrt(m)}


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_legal_graph_passes_and_is_valid_onnx(fmt):
    m = legal_model(fmt)
    onnx.checker.check_model(m, full_check=True)  # the pattern itself is valid, strictly typed ONNX
    assert check_tensorrt(m) == []
    assert gemm_quantization(m) == {"gemms": 3, "quantized": 3, "half": 0}
    assert has_quantized_gemm(m)


def test_legal_graph_runs_in_onnx_runtime():
    # ONNX Runtime CPU executes the INT8 pattern (fp16 Q/DQ + MatMul): the legal graph is a real, runnable graph.
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(legal_model("int8").SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {"x": np.random.default_rng(1).normal(size=(2, 3, K)).astype(np.float32)})
    assert out.shape == (6, M) and np.isfinite(out).all()


def test_checker_reads_a_path(tmp_path):
    p = tmp_path / "m.onnx"
    onnx.save(legal_model(), p)
    assert check_tensorrt(p) == []


def test_fp16_graph_without_qdq_passes_and_has_no_quantized_gemm():
    m = legal_model()
    # Strip every Q/DQ and the quantized weights: a plain FP16 graph (model_fp16.onnx's shape) is legal too.
    g = m.graph
    drop = [n for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    rename = {}
    for n in drop:
        rename[n.output[0]] = n.input[0]
        g.node.remove(n)
    for t in list(g.initializer):
        if t.name.endswith(("_q", "_zp", "_scale")):
            g.initializer.remove(t)
    for name in ("w1", "w2", "w3"):
        dims = {"w1": [K, N], "w2": [M, N], "w3": [M, M]}[name]
        g.initializer.append(_const(name, F16, dims, np.full(dims, 0.01)))
        rename.pop(name, None)

    def root(x):
        while x in rename:
            x = rename[x]
        return x

    for n in g.node:
        for i, x in enumerate(n.input):
            n.input[i] = root(x)
    assert check_tensorrt(m) == []
    assert gemm_quantization(m) == {"gemms": 3, "quantized": 0, "half": 0}
    assert not has_quantized_gemm(m)


# ---- each rule planted once -------------------------------------------------------------------------------


def plant_uint8_cast_output(m):
    m.graph.node.append(helper.make_node("Cast", ["logits"], ["logits_u8"], name="to_u8", to=TensorProto.UINT8))
    m.graph.output.append(helper.make_tensor_value_info("logits_u8", TensorProto.UINT8, [None, M]))


def plant_uint8_activation_qdq(m):
    # The old export's unsigned softmax P: UINT8 zero point -> UINT8 Q/DQ.
    _replace_init(m, helper.make_tensor("a2_zp", TensorProto.UINT8, [], [0]))


def plant_missing_zero_point(m):
    for name in ("a1_q", "a1_dq"):
        del _node(m, name).input[2]


def plant_nonzero_zero_point(m):
    _replace_init(m, helper.make_tensor("a1_zp", TensorProto.INT8, [], [3]))


def plant_negative_scale(m):
    _replace_init(m, _const("a2_scale", F16, [], [-0.03]))


def plant_nonfinite_weight_scale(m):
    _replace_init(m, _const("w1_scale", F16, [N], [0.01] * (N - 1) + [np.inf]))


def plant_runtime_scale(m):
    # Scale computed in the graph (Identity of the constant): not a build-time constant any more.
    m.graph.node.insert(0, helper.make_node("Identity", ["a1_scale"], ["a1_scale_rt"], name="scale_rt"))
    for name in ("a1_q", "a1_dq"):
        _node(m, name).input[1] = "a1_scale_rt"


def plant_wrong_weight_axis(m):
    # W1 [K, N] is MatMul's B: per-channel must be on N (axis 1); axis 0 with K scales is the input-channel axis.
    _replace_init(m, _const("w1_scale", F16, [K], np.full(K, 0.01)))
    _replace_init(m, helper.make_tensor("w1_zp", TensorProto.INT8, [K], [0] * K))
    _node(m, "w1_dq").attribute[0].i = 0


def plant_wrong_axis_through_transpose(m):
    # W2 [M, N] reaches MatMul's B through Transpose: its output channel is axis 0, not 1.
    _replace_init(m, _const("w2_scale", F16, [N], np.full(N, 0.01)))
    _replace_init(m, helper.make_tensor("w2_zp", TensorProto.INT8, [N], [0] * N))
    _node(m, "w2_dq").attribute[0].i = 1


def plant_per_channel_activation(m):
    _replace_init(m, _const("a1_scale", F16, [K], np.full(K, 0.03)))
    _replace_init(m, helper.make_tensor("a1_zp", TensorProto.INT8, [K], [0] * K))
    for name in ("a1_q", "a1_dq"):
        _node(m, name).attribute.append(helper.make_attribute("axis", 2))


def plant_q_feeding_non_dq(m):
    m.graph.node.append(helper.make_node("Identity", ["a1_q"], ["a1_q_copy"], name="peek"))
    m.graph.output.append(helper.make_tensor_value_info("a1_q_copy", TensorProto.INT8, ["b", "s", K]))


def plant_dq_without_q(m):
    # An activation DQ fed straight from a graph input (int8 input): there is no Q to pair with.
    m.graph.input.append(helper.make_tensor_value_info("x_int8", TensorProto.INT8, ["b", "s", K]))
    _node(m, "a1_dq").input[0] = "x_int8"
    m.graph.node.remove(_node(m, "a1_q"))


def plant_half_quantized_gemm(m):
    # mm1 reads the fp16 activation directly: only its weight is Q/DQ.
    _node(m, "mm1").input[0] = "x16"
    for name in ("a1_q", "a1_dq"):
        m.graph.node.remove(_node(m, name))


def plant_opset_too_new(m):
    m.opset_import[0].version = 23


def plant_opset_too_old_for_fp16_scales(m):
    m.opset_import[0].version = 17


def plant_mixed_operand_types(m):
    _replace_init(m, _const("b1", TensorProto.FLOAT, [N], np.zeros(N)))  # fp32 bias added to an fp16 GEMM output


PLANTS = {
    # plant: the exact set of rules it must trigger (a missing zero point makes ONNX type the Q output UINT8, so
    # qdq-type fires with zero-point; opset 17 cannot type fp16 scales, so strict inference fails with it).
    plant_uint8_cast_output: {"qdq-type"},
    plant_uint8_activation_qdq: {"qdq-type", "zero-point"},
    plant_missing_zero_point: {"zero-point", "qdq-type"},
    plant_nonzero_zero_point: {"zero-point"},
    plant_negative_scale: {"scale"},
    plant_nonfinite_weight_scale: {"scale"},
    plant_runtime_scale: {"scale"},
    plant_wrong_weight_axis: {"per-channel"},
    plant_wrong_axis_through_transpose: {"per-channel"},
    plant_per_channel_activation: {"per-channel"},
    plant_q_feeding_non_dq: {"qdq-pairs"},
    plant_dq_without_q: {"qdq-pairs"},
    plant_half_quantized_gemm: {"gemm-inputs"},
    plant_opset_too_new: {"opset"},
    plant_opset_too_old_for_fp16_scales: {"opset", "strong-types"},
    plant_mixed_operand_types: {"strong-types"},
}


@pytest.mark.parametrize("plant", list(PLANTS), ids=[p.__name__ for p in PLANTS])
def test_each_planted_violation_is_caught_under_its_rule(plant):
    m = legal_model()
    plant(m)
    violations = check_tensorrt(m)
    assert {v.rule for v in violations} == PLANTS[plant], [v.line("m.onnx") for v in violations]
    assert all(v.rule in RULES and v.node and v.message for v in violations)


def test_every_rule_has_a_plant():
    assert set().union(*PLANTS.values()) == set(RULES)


def test_fp8_plant_is_caught_too():
    m = legal_model("fp8")
    _replace_init(m, helper.make_tensor("a1_zp", TensorProto.FLOAT8E4M3FN, [], [1.0]))
    assert rules(m) == {"zero-point"}


def test_violation_messages_name_node_and_fix():
    m = legal_model()
    plant_wrong_weight_axis(m)
    (v,) = check_tensorrt(m)
    assert v.node == "w1_dq"
    assert v.line("m.onnx").startswith("m.onnx: per-channel: w1_dq: ")
    m = legal_model()
    plant_half_quantized_gemm(m)
    (v,) = check_tensorrt(m)
    assert (v.node, v.rule) == ("mm1", "gemm-inputs") and "quantize x16" in v.message


# ---- the CLI ---------------------------------------------------------------------------------------------


def test_cli_ok_violations_and_bad_arguments(tmp_path, capsys):
    good, bad = tmp_path / "good.onnx", tmp_path / "bad.onnx"
    onnx.save(legal_model(), good)
    m = legal_model()
    plant_negative_scale(m)
    plant_half_quantized_gemm(m)
    onnx.save(m, bad)

    assert check_main([str(good), "--engine", "tensorrt"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{good}: ok"]

    assert check_main([str(good), str(bad), "--engine", "tensorrt"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{good}: ok"
    assert sorted(line.split(": ")[1:3] for line in lines[1:]) == [["gemm-inputs", "mm1"], ["scale", "a2_dq"], ["scale", "a2_q"]]
    assert all(line.startswith(f"{bad}: ") for line in lines[1:])

    assert check_main([str(tmp_path / "missing.onnx"), "--engine", "tensorrt"]) == 2
    assert "missing.onnx" in capsys.readouterr().err
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all \x00\xff")
    assert check_main([str(tmp_path / "junk.onnx"), "--engine", "tensorrt"]) == 2
    with pytest.raises(SystemExit) as e:
        check_main([str(good), "--engine", "openvino"])
    assert e.value.code == 2


def test_cli_module_runs_as_a_command(tmp_path):
    good = tmp_path / "good.onnx"
    onnx.save(legal_model(), good)
    r = subprocess.run(
        [sys.executable, "-m", "pipeline.check", str(good), "--engine", "tensorrt"], capture_output=True, text=True, cwd=ROOT
    )
    assert (r.returncode, r.stdout) == (0, f"{good}: ok\n"), r.stderr


# ---- TensorRT 11's removed APIs ---------------------------------------------------------------------------

# From TensorRT's 10.x -> 11.x migration guide, "Removed Python APIs and Replacements" and "Removed C++ APIs and
# Replacements" (docs.nvidia.com/deeplearning/tensorrt/11.4.0/api/migration/tensorrt-10x-to-11x-python-api-reference.html
# and ...-c-api-reference.html): the precision builder flags, the INT8 calibrator API, calibration profiles,
# quantization flags, platform_has_fast_* queries, the algorithm selector, ICudaEngine.device_memory_size (-> _v2).
# platform_has_tf32 is gone from the 11.0 Python Builder reference too. NetworkDefinitionCreationFlag.STRONGLY_TYPED is
# deprecated-but-accepted in 11 (Builder reference 11.0) and needed on 10.x, so it is not listed.
_FLAGS = ("FP16", "INT8", "FP8", "BF16", "INT4", "FP4", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS", "DIRECT_IO")
REMOVED_IN_TRT11 = [rf"BuilderFlag(\.|::)k?{f}\b" for f in _FLAGS] + [
    r"\bint8_calibrator\b",
    r"\bsetInt8Calibrator\b",
    r"\bIInt8(Legacy|Entropy|MinMax)?Calibrator2?\b",
    r"\bCalibrationAlgoType\b",
    r"\b[sg]et_calibration_profile\b",
    r"\b(set|get|clear)_quantization_flag\b",
    r"\bquantization_flags\b",
    r"\bQuantizationFlag\b",
    r"\bplatform_has_fast_(fp16|int8)\b",
    r"\bplatformHasFast(Fp16|Int8)\b",
    r"\bplatform_has_tf32\b",
    r"\bIAlgorithm(Selector|Context|IOInfo|Variant)?\b",
    r"\balgorithm_selector\b",
    r"\bdevice_memory_size\b(?!_)",
]
SCANNED = ("pipeline", "scripts", "benchmarks")


def find_removed_apis(paths: list[Path]) -> list[str]:
    """`file:line: pattern` for every use of a TensorRT-11-removed API in the given files / folders."""
    pats = [re.compile(p) for p in REMOVED_IN_TRT11]
    hits = []
    files = [f for p in paths for f in (sorted(p.rglob("*")) if p.is_dir() else [p])]
    for f in files:
        if not f.is_file() or "__pycache__" in f.parts or f.suffix not in (".py", ".sh", ".yaml", ".yml", ".md", ".txt", ".toml", ""):
            continue
        for i, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            hits += [f"{f}:{i}: {p.pattern}" for p in pats if p.search(line)]
    return hits


def test_no_tensorrt11_removed_api_in_the_code():
    assert find_removed_apis([ROOT / d for d in SCANNED]) == []


@pytest.mark.parametrize(
    "planted",
    [
        "config.set_flag(trt.BuilderFlag.FP16)",
        "config.int8_calibrator = Calib()",
        "if builder.platform_has_fast_int8:",
        "class C(trt.IInt8EntropyCalibrator2):",
    ],
)
def test_removed_api_scan_catches_a_planted_use(tmp_path, planted):
    (tmp_path / "engine.py").write_text(f"import tensorrt as trt\n{planted}\n")
    assert len(find_removed_apis([tmp_path])) >= 1
    assert find_removed_apis([tmp_path])[0].startswith(f"{tmp_path / 'engine.py'}:2:")


def test_violation_is_a_plain_record():
    assert Violation("scale", "n", "m").line("f.onnx") == "f.onnx: scale: n: m"


def test_weights_as_numpy_helper_roundtrip_sanity():
    # The FP8 builder stores weights through make_tensor's float -> E4M3FN conversion; they must stay finite.
    m = legal_model("fp8")
    w = numpy_helper.to_array(_init(m, "w1_q")).astype(np.float32)
    assert np.isfinite(w).all() and np.abs(w).max() <= 448


# ---- the TensorRT engine's parts that need no TensorRT ------------------------------------------------------


def _fake_trt(version: str):
    from types import SimpleNamespace

    return SimpleNamespace(__version__=version, NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=0))


def test_network_flags_strongly_typed_on_10x_and_none_on_11x():
    from pipeline.engines.tensorrt import network_flags

    assert network_flags(_fake_trt("10.15.1")) == 1  # 1 << STRONGLY_TYPED: opt-in on 10.x
    assert network_flags(_fake_trt("11.4.0")) == 0  # always strongly typed; the flag is deprecated and ignored


def test_check_names_the_targeted_version_for_an_old_tensorrt(monkeypatch):
    from pipeline.engines import tensorrt as trt_engine
    from pipeline.schema import engine_config

    monkeypatch.setitem(sys.modules, "tensorrt", _fake_trt("8.6.1"))
    problems = trt_engine.check(engine_config("tensorrt"))
    assert problems[0] == (
        "engine=tensorrt: TensorRT 8.6.1 found; this engine targets TensorRT 11.x (10.x accepted); "
        "pip install tensorrt on a machine with an NVIDIA GPU"
    )
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_trt("11.4.0"))
    assert not any("TensorRT" in p and "found" in p for p in trt_engine.check(engine_config("tensorrt")))


def test_graph_precision_reads_the_graph():
    from pipeline.engines.trt_rules import graph_precision

    assert graph_precision(legal_model("int8")) == "int8"
    assert graph_precision(legal_model("fp8")) == "fp8"


def test_engine_refuses_illegal_or_mislabelled_graphs_before_importing_tensorrt(tmp_path):
    from pipeline.engines.tensorrt import check_graph

    good, bad = tmp_path / "int8.onnx", tmp_path / "bad.onnx"
    onnx.save(legal_model("int8"), good)
    check_graph(good, "int8")  # legal and labelled right: no exception
    m = legal_model("int8")
    plant_uint8_activation_qdq(m)
    onnx.save(m, bad)
    with pytest.raises(RuntimeError, match=r"not a legal TensorRT graph .*\n.*bad.onnx: (qdq-type|zero-point): a2_"):
        check_graph(bad, "int8")
    with pytest.raises(ValueError, match="is a int8 graph, not fp8"):
        check_graph(good, "fp8")
    with pytest.raises(ValueError, match="'fp32': one of fp16, int8, fp8"):
        check_graph(good, "fp32")
    m = legal_model("int8")
    plant_half_quantized_gemm(m)
    onnx.save(m, bad)
    check_graph(bad, "int8")  # a half-quantized GEMM builds (in float): a warning, not a refusal
