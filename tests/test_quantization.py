"""Quantization core: TensorQuantizer numerics and gradients, QuantLinear export, placement rules."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from pipeline.onnx_export import export, fold_weight_quantization, rewrite
from pipeline.quantization.modules import QuantLinear
from pipeline.quantization.placement import insert_quantizers
from pipeline.quantization.tensor_quantizer import TensorQuantizer
from pipeline.schema import CalibrationConfig, QuantConfig, QuantRule


def test_per_tensor_fake_quant_matches_formula():
    q = TensorQuantizer("linear_input")
    q.load_amax(torch.tensor(2.0))
    x = torch.linspace(-3, 3, 101)
    scale = 2.0 / 127
    expected = torch.clamp(torch.round(x / scale), -128, 127) * scale
    assert torch.allclose(q(x), expected)


def test_per_channel_and_unsigned():
    w = torch.randn(4, 8)
    q = TensorQuantizer("linear_weight", axis=0)
    q.load_amax(w.abs().amax(1))
    out = q(w)
    scale = (w.abs().amax(1) / 127).unsqueeze(1)
    assert torch.allclose(out, torch.round(w / scale) * scale, atol=1e-6)
    u = TensorQuantizer("attn_probs", unsigned=True)
    u.load_amax(torch.tensor(1.0))
    p = torch.rand(10)
    assert torch.allclose(u(p), torch.round(p * 255) / 255, atol=1e-6)
    assert (u.qmin, u.qmax) == (0, 255)


def test_straight_through_gradient_clips_outside_range():
    q = TensorQuantizer("linear_input")
    q.load_amax(torch.tensor(1.0))
    x = torch.tensor([-2.0, -0.5, 0.3, 0.99, 1.5], requires_grad=True)
    q(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_learnable_amax_gets_a_gradient_and_same_forward():
    q = TensorQuantizer("linear_input")
    q.load_amax(torch.tensor(1.0))
    x = torch.randn(64) * 2
    fixed = q(x)
    q.set_learnable(True)
    q.train()
    y = q(x)
    assert torch.allclose(y, fixed, atol=1e-6)
    y.pow(2).sum().backward()
    assert isinstance(q.amax, torch.nn.Parameter) and q.amax.grad is not None and torch.isfinite(q.amax.grad)


def test_asymmetric_fake_quant_uses_the_signed_range_and_keeps_zero_exact():
    q = TensorQuantizer("linear_input", asymmetric=True)
    q.calibrating = True
    x = torch.nn.functional.gelu(torch.linspace(-4, 6, 1001))  # min -0.17, max 6
    assert torch.equal(q(x), x)
    q.calibrating = False
    assert q.signed_range.tolist() == pytest.approx([float(x.min()), float(x.max())])
    q.load_amax(torch.tensor(4.0))  # the calibrated clip: the range is [min, 4], not [-4, 4]
    scale, zp = q.asymmetric_qparams()
    assert scale == pytest.approx((4.0 - float(x.min())) / 255, rel=1e-3) and zp == round(-float(x.min()) / scale)
    y = q(x)
    inside = x <= 4.0
    assert float((y - x)[inside].abs().max()) <= scale / 2 + 1e-6  # half a step, 2x finer than symmetric's 4/127
    assert float(y.max()) == pytest.approx(4.0, abs=scale) and float(q(torch.zeros(3)).abs().max()) == 0.0
    with pytest.raises(ValueError, match="symmetric"):
        q.set_learnable(True)
    with pytest.raises(ValueError, match="per-tensor"):
        TensorQuantizer("linear_weight", axis=0, asymmetric=True)


def test_asymmetric_forward_reads_nothing_to_the_host_and_matches_the_exported_constants(monkeypatch):
    """QAT on a GPU: a host read per asymmetric quantizer per step is a device sync. The forward's tensor
    qparams equal the export's Python constants bit for bit, over ranges with and without a signed range."""
    from pipeline import onnx_export

    rng = np.random.default_rng(0)
    for lo, hi, amax in [(-0.17, 6.0, 4.0), (-3.0, 0.5, 2.0), (0.0, 1.0, 1.0), (-1e-9, 1e-9, 1e-9), (None, None, 0.7)]:
        q = TensorQuantizer("linear_input", asymmetric=True)
        q.load_amax(torch.tensor(amax))
        if lo is not None:
            q.signed_range = torch.tensor([lo, hi])
        scale, zero = q.asymmetric_qparams_tensors()
        assert (float(scale), int(zero)) == (np.float32(q.asymmetric_qparams()[0]), q.asymmetric_qparams()[1])
        x = torch.from_numpy(rng.normal(0, 2, 4096).astype(np.float32))
        model = torch.nn.ModuleDict({"q": q})
        with onnx_export.constant_scales(model):
            exported = q(x)

        def no_host_read(*a, **k):
            raise AssertionError("host read in the forward")

        with monkeypatch.context() as m:
            for name in ("numpy", "item", "tolist", "__float__", "__int__", "cpu"):
                m.setattr(torch.Tensor, name, no_host_read)
            y = q(x)
        assert torch.equal(y, exported)


def test_asymmetric_state_round_trips_through_the_files(tmp_path):
    from safetensors.torch import load_file

    from pipeline.quantization.state import load_quantizer_state, quant_map, save_quantizer_state

    q = TensorQuantizer("linear_input", asymmetric=True)
    q.calibrating = True
    q(torch.tensor([-0.5, 3.0]))
    q.calibrating = False
    q.load_amax(torch.tensor(2.0))
    save_quantizer_state({"a": q}, tmp_path)
    fresh = TensorQuantizer("linear_input", asymmetric=True)
    load_quantizer_state({"a": fresh}, load_file(str(tmp_path / "quantizers.safetensors")))
    assert fresh.asymmetric_qparams() == q.asymmetric_qparams() != (2.0 / 127, 0)
    row = quant_map({"a": q})[0]
    assert row["asymmetric"] and row["zero_point"] == q.asymmetric_qparams()[1]


def test_calibrating_passes_through_and_collects():
    q = TensorQuantizer("linear_input", calibrator="histogram")
    q.calibrating = True
    x = torch.randn(100)
    assert torch.equal(q(x), x)
    assert q.calibrator.compute_amax("percentile", percentile=100) == pytest.approx(float(x.abs().max()), rel=1e-3)


@pytest.mark.parametrize("weight_bits,asymmetric", [(7, False), (8, False), (7, True)])
def test_quant_linear_exports_qdq_that_onnxruntime_runs_as_int8(tmp_path, weight_bits, asymmetric):
    """7-bit weights (quant.weight_range=reduced) are exact on every x86 CPU; full-range 8-bit weights
    only where ORT's int8 GEMM does not saturate (VNNI), which weight_range=auto detects. An asymmetric input
    exports as uint8 Q/DQ with its zero point, and ORT's integer GEMM gives torch's numbers."""
    from pipeline.engines.onnxruntime import weight_range_for
    from pipeline.onnx_export import constant_tensors
    from pipeline.schema import engine_config

    if weight_bits == 8 and weight_range_for(engine_config("onnxruntime"))[0] == "reduced":
        pytest.skip("x86 CPU without VNNI: ORT's int8 GEMM saturates with full-range weights (what weight_range=auto avoids)")
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8)
    with torch.no_grad():
        lin.weight[0, 0] = 3.0  # a weight beyond the others' amax after calibration below: clamped identically
    wq = TensorQuantizer("linear_weight", axis=0, num_bits=weight_bits)
    ql = QuantLinear.from_linear(lin, TensorQuantizer("linear_input", asymmetric=asymmetric), wq)
    x = torch.randn(2, 5, 16)
    if asymmetric:  # a GELU output: lopsided, min -0.17
        x = torch.nn.functional.gelu(3 * x)
        ql.input_quantizer.calibrating = True
        ql.input_quantizer(x)
        ql.input_quantizer.calibrating = False
    ql.input_quantizer.load_amax(x.abs().max())
    ql.weight_quantizer.load_amax(lin.weight.abs().amax(1).clamp(max=0.25))

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.l = ql

        def forward(self, input_ids):
            return type("O", (), {"logits": self.l(input_ids)})()

    path = tmp_path / "q.onnx"
    export(M().eval(), {"input_ids": x}, path, 17)
    assert rewrite(path, fold_weight_quantization) == [1]
    g = onnx.load(str(path)).graph
    ops = [n.op_type for n in g.node]
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 2 and "Transpose" not in ops
    q_node = next(n for n in g.node if n.op_type == "QuantizeLinear")
    zp = numpy_helper.to_array(constant_tensors(g)[q_node.input[2]]) if len(q_node.input) > 2 else None
    if asymmetric:
        scale, zero_point = ql.input_quantizer.asymmetric_qparams()
        assert zp is not None and zp.dtype == np.uint8 and int(zp) == zero_point > 0
        assert 0 < zero_point < 32 and scale < float(x.abs().max()) / 127 * 0.6  # most of the 256 levels on the positive side
    w8 = next(numpy_helper.to_array(i) for i in g.initializer if i.data_type == onnx.TensorProto.INT8)
    assert w8.min() == -(2 ** (weight_bits - 1)) or w8.max() == 2 ** (weight_bits - 1) - 1  # the clipped weight
    assert w8.min() >= -(2 ** (weight_bits - 1)) and w8.max() <= 2 ** (weight_bits - 1) - 1
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    out = sess.run(None, {"input_ids": x.numpy()})[0]
    assert np.allclose(out, ql(x).detach().numpy(), atol=1e-4)
    assert "MatMulIntegerToFloat" in [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]


def _tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=2)
    return BertForSequenceClassification(cfg).eval()


EXAMPLE = {
    "input_ids": torch.tensor([[1, 5, 6, 7, 2], [1, 8, 2, 0, 0]]),
    "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
}
CALIB = CalibrationConfig(method="max")
HEAD = {"heads": QuantRule(name=["classifier.*", "*pooler.*"], enable=False)}


def _roles(qs):
    out: dict[str, int] = {}
    for q in qs.values():
        out[q.role] = out.get(q.role, 0) + 1
    return out


def test_placement_every_gemm_head_excluded():
    m = _tiny_bert()
    qs = insert_quantizers(m, QuantConfig(rules=HEAD), CALIB, EXAMPLE)
    assert _roles(qs) == {"linear_input": 12, "linear_weight": 12, "attn_q": 2, "attn_k": 2, "attn_probs": 2, "attn_v": 2}
    assert not isinstance(m.classifier, QuantLinear) and not isinstance(m.bert.pooler.dense, QuantLinear)
    assert all(q.unsigned == (q.role == "attn_probs") for q in qs.values())


def test_placement_globs_roles_and_residual():
    m = _tiny_bert()
    rules = {
        **HEAD,
        "layer0": QuantRule(name=["*.layer.0.*"], enable=False),
        "no_inputs": QuantRule(roles=["linear_input"], enable=False),
        # later rules win per field: layer 1's value input is back on (and only its enable changes)
        "v1_input": QuantRule(name=["*.layer.1.attention.self.value.*"], roles=["linear_input"], enable=True),
    }
    qs = insert_quantizers(m, QuantConfig(attention=False, rules=rules), CALIB, EXAMPLE)
    assert _roles(qs) == {"linear_input": 6, "linear_weight": 6}  # layer 0 and the heads: no quantizers at all
    assert not isinstance(m.bert.encoder.layer[0].attention.self.query, QuantLinear)
    on = [n for n, q in qs.items() if q.role == "linear_input" and q.enabled]
    assert on == ["bert.encoder.layer.1.attention.self.value.input_quantizer"]
    m = _tiny_bert()
    qs = insert_quantizers(m, QuantConfig(residual=True, rules=HEAD), CALIB, EXAMPLE)
    assert _roles(qs)["residual"] == 4  # attention.output.LayerNorm + output.LayerNorm per layer; embeddings excluded


def test_weight_range_auto_is_reduced_only_for_ort_cpu_on_x86_without_vnni():
    from pipeline.engines.onnxruntime import weight_range_for
    from pipeline.schema import engine_config

    ort_cpu = engine_config("onnxruntime")
    assert weight_range_for(ort_cpu, {"avx2", "fma"}, "x86_64")[0] == "reduced"
    assert weight_range_for(ort_cpu, {"avx2", "avx512_vnni"}, "x86_64")[0] == "full"
    assert weight_range_for(ort_cpu, {"avx2", "avx_vnni"}, "x86_64")[0] == "full"
    assert weight_range_for(ort_cpu, set(), "aarch64")[0] == "full"
    assert weight_range_for(engine_config("tensorrt"), {"avx2"}, "x86_64")[0] == "full"
    gpu = engine_config("onnxruntime", None, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert weight_range_for(gpu, {"avx2"}, "x86_64")[0] == "full"


def test_rules_apply_in_order_and_the_later_rule_wins_per_field():
    from pipeline.quantization import rules as qrules

    rules = qrules.as_rules(
        {
            "all_mse": {"method": "mse"},
            "layer1_off": {"name": ["*.layer.1.*"], "enable": False},
            "layer1_v_pct": {"name": ["*.layer.1.*.value.*"], "method": "percentile", "percentile": 99.9},
            "weights": {"roles": ["linear_weight"], "enable": True},
        }
    )
    v1 = "bert.encoder.layer.1.attention.self.value.input_quantizer"
    assert qrules.resolve(v1, "linear_input", rules) == {"method": "percentile", "percentile": 99.9, "enable": False}
    # method / percentile never reach a weight; the later enable rule turns layer 1's weights back on
    assert qrules.resolve(v1.replace("input", "weight"), "linear_weight", rules) == {"enable": True}
    assert qrules.resolve("bert.encoder.layer.0.output.dense.input_quantizer", "linear_input", rules) == {"method": "mse"}
    base = CalibrationConfig(method="percentile", percentile=99.99)
    assert qrules.calibration_for("x", "attn_q", base, []) is base  # no rule: the run's own settings object
    got = qrules.calibration_for(v1, "linear_input", base, rules)
    assert (got.method, got.percentile) == ("percentile", 99.9)
    # Reversed order: the earlier "all_mse" rule now comes last and wins the method.
    got = qrules.calibration_for(v1, "linear_input", base, list(reversed(rules)))
    assert (got.method, got.percentile) == ("mse", 99.9)
