"""OpenVINO engine (engine=openvino) and the NNCF peer, on the graphs a tiny random BERT run exports:
int8 kernels proven from the runtime graph, parity with ONNX Runtime on the same ONNX, the precision
key, the saved IR, the weight-range measurement and the missing-package message."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from pipeline.data import batches
from pipeline.engines import ENGINES, GRAPHS
from pipeline.engines import openvino as ov_engine
from pipeline.engines.peers import PeerInputs
from pipeline.schema import ConfigError, EngineConfig, engine_config
from pipeline.testing import run_tiny
from pipeline.validation import validate
from tests.conftest import compose_cfg

ROOT = Path(__file__).parent.parent
# Export only: no fine-tune, no QAT, no engine / benchmark of the run itself.
EXPORT_ONLY = ["finetune=none", "qat=none", "engine=none", "benchmark=none", "evaluate.enabled=false", "export.tensorrt_graphs=false"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny run's ONNX files and eval feeds (two length-padded batches of 16, real padding masks)."""
    root = tmp_path_factory.mktemp("openvino")
    ctx = run_tiny(root, EXPORT_ONLY)
    feeds = [{k: v.numpy() for k, v in b.inputs.items()} for b in batches(ctx.tokenizer, ctx.encoded["eval"], 16, limit=2)]
    assert any((f["attention_mask"] == 0).any() for f in feeds)  # padding reaches the engines
    return {"fp32": ctx.artifacts.onnx["model_fp32.onnx"], "int8": ctx.artifacts.onnx["model_int8.onnx"], "feeds": feeds, "root": root}


def _cfg(**kw) -> EngineConfig:
    return engine_config("openvino", None, **kw)


def _ort(path: Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))


def _quantized_linears(path: Path) -> int:
    """MatMuls of a Q/DQ graph whose weight is a DequantizeLinear of an int8 initializer (the Linears)."""
    g = onnx.load(str(path)).graph
    inits = {i.name for i in g.initializer}
    dq_weights = {n.output[0] for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    return sum(n.op_type == "MatMul" and n.input[1] in dq_weights for n in g.node)


def test_fp32_graph_matches_onnxruntime_with_no_int8_layers(tiny, tmp_path):
    e = ov_engine.build(tiny["fp32"], "fp32", _cfg(inference_precision="f32"), tmp_path)
    assert e.inference_precision == "f32" and not e.emulated
    assert e.input_names == ["input_ids", "attention_mask", "token_type_ids"]
    for feed in tiny["feeds"]:
        out = e.run({**feed, "labels": np.zeros(len(feed["input_ids"]))})  # keys the model does not take are left out
        assert out.dtype == np.float32 and out.shape == (len(feed["input_ids"]), 2)
        np.testing.assert_allclose(out, _ort(tiny["fp32"], feed), rtol=1e-4, atol=1e-6)
    assert ov_engine.int8_gemm_layers(e.kernels) == 0
    assert e.kernels.get("FullyConnected:f32", 0) > 0 and all(k.split(":")[1] == "f32" for k in e.kernels), e.kernels


def test_int8_graph_runs_every_linear_in_int8_and_agrees_with_onnxruntime(tiny, tmp_path):
    e = ov_engine.build(tiny["int8"], "int8", _cfg(inference_precision="f32"), tmp_path)
    assert not e.emulated
    # Each Q/DQ Linear of the graph is one i8/u8 FullyConnected; the unquantized pooler and classifier stay float.
    linears = _quantized_linears(tiny["int8"])
    assert linears > 0 and ov_engine.int8_gemm_layers(e.kernels) == linears, e.kernels
    assert sum(n for k, n in e.kernels.items() if k.startswith("FullyConnected:")) == linears + 2
    ours = np.concatenate([e.run(f) for f in tiny["feeds"]])
    ref = np.concatenate([_ort(tiny["int8"], f) for f in tiny["feeds"]])
    assert _cosine(ours, ref) > 0.999 and (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.95


def test_saved_ir_is_the_model_that_runs(tiny, tmp_path):
    e = ov_engine.build(tiny["int8"], "int8", _cfg(inference_precision="f32"), tmp_path)
    xml = e.files["openvino_ir"]
    assert xml == tmp_path / "model_int8.openvino.xml" and xml.with_suffix(".bin").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind
    # Built from the IR, the engine needs no ONNX, writes nothing new and gives the same logits.
    again = ov_engine.build(xml, "int8", _cfg(inference_precision="f32"), tmp_path / "again")
    assert again.files["openvino_ir"] == xml and not (tmp_path / "again").exists()
    assert again.kernels == e.kernels
    np.testing.assert_array_equal(again.run(tiny["feeds"][0]), e.run(tiny["feeds"][0]))


@pytest.mark.parametrize("precision", ["f32", "bf16", "f16"])
def test_inference_precision_reaches_the_compiled_model(tiny, tmp_path, precision):
    if precision != "f32" and {"bf16": "BF16", "f16": "FP16"}[precision] not in ov_engine.cpu_capabilities():
        pytest.skip(f"this CPU has no {precision} in OpenVINO's OPTIMIZATION_CAPABILITIES")
    # engine.inference_precision: the float layers of the quantized engine (the pooler and classifier GEMMs)
    e = ov_engine.build(tiny["int8"], "int8", _cfg(inference_precision=precision, intra_op_threads=1), tmp_path)
    assert e.inference_precision == precision
    assert e.kernels.get(f"FullyConnected:{precision}", 0) == 2, e.kernels  # the float GEMMs really run in it
    assert e.compiled.get_property("INFERENCE_NUM_THREADS") == 1
    # a float engine runs in the precision it is labelled with, whatever the key: the fp32 baseline stays exact
    label = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}[precision]
    base = ov_engine.build(tiny["fp32"], "fp32", _cfg(inference_precision=precision), tmp_path / "fp32")
    assert base.inference_precision == "f32" and base.kernels.get("FullyConnected:f32", 0) > 0, base.kernels
    fl = ov_engine.build(tiny["fp32"], label, _cfg(), tmp_path / label)
    assert fl.inference_precision == precision and fl.kernels.get(f"FullyConnected:{precision}", 0) > 0 and not fl.emulated


def test_default_precision_is_recorded_as_the_plugin_chose_it(tiny, tmp_path):
    e = ov_engine.build(tiny["int8"], "int8", _cfg(), tmp_path)
    assert e.inference_precision in ("f32", "bf16", "f16")
    # The unquantized GEMMs (pooler, classifier) run in the recorded precision.
    assert e.kernels.get(f"FullyConnected:{e.inference_precision}", 0) == 2, (e.inference_precision, e.kernels)


def test_bind_runs_the_bound_inputs_of_any_shape(tiny, tmp_path):
    e = ov_engine.build(tiny["int8"], "int8", _cfg(inference_precision="f32"), tmp_path)
    feed = {k: v[:1, :7].copy() for k, v in tiny["feeds"][0].items()}
    call = e.bind(feed)
    assert call() is None and call() is None
    np.testing.assert_allclose(e.run(feed), _ort(tiny["int8"], feed), rtol=1e-4, atol=1e-6)


def test_fp8_graph_is_read_correctly_but_emulated(tmp_path):
    ctx = run_tiny(tmp_path, [*EXPORT_ONLY, "quant.format=fp8"])
    path = ctx.artifacts.onnx["model_fp8.onnx"]
    assert GRAPHS["openvino"]["fp8"] == {"fp32": "model_fp32.onnx", "fp8": "model_fp8.onnx"}
    e = ov_engine.build(path, "fp8", _cfg(inference_precision="f32"), tmp_path)
    assert e.emulated and ov_engine.int8_gemm_layers(e.kernels) == 0
    feed = next(iter({k: v.numpy() for k, v in b.inputs.items()} for b in batches(ctx.tokenizer, ctx.encoded["eval"], 16)))
    assert _cosine(e.run(feed), _ort(path, feed)) > 0.9999


def _peer(tiny, out: Path, reduce_range: bool) -> PeerInputs:
    return PeerInputs(tiny["fp32"], out, num_heads=2, hidden_size=64, reduce_range=reduce_range, calibration=lambda: iter(tiny["feeds"]))


def _gemm_weights(xml: Path) -> list[np.ndarray]:
    """The int8 weight constants of an IR that feed a MatMul (embedding tables, also int8, feed Gathers)."""
    import openvino as ov

    def reaches_matmul(node, depth=4) -> bool:
        nxt = [t.get_node() for o in node.outputs() for t in o.get_target_inputs()]
        return any(n.get_type_name() == "MatMul" or (depth and reaches_matmul(n, depth - 1)) for n in nxt)

    model = ov.Core().read_model(str(xml))
    consts = [op for op in model.get_ops() if op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.i8]
    return [op.get_data() for op in consts if reaches_matmul(op)]


@pytest.mark.parametrize("reduce_range", [False, True])
def test_nncf_ptq_builds_an_int8_ir_the_engine_runs(tiny, tmp_path, reduce_range):
    from pipeline.engines.peers import nncf_ptq

    xml = nncf_ptq(_peer(tiny, tmp_path, reduce_range))
    assert xml == tmp_path / "nncf_ptq.xml" and xml.with_suffix(".bin").exists()
    e = ov_engine.build(xml, "int8", _cfg(inference_precision="f32"), tmp_path)
    assert e.files["openvino_ir"] == xml
    assert ov_engine.int8_gemm_layers(e.kernels) >= _quantized_linears(tiny["int8"]), e.kernels
    # 7-bit weights where the machine needs them (overflow_fix), full range otherwise.
    weights = _gemm_weights(xml)
    assert len(weights) >= _quantized_linears(tiny["int8"])
    assert max(int(np.abs(w.astype(np.int32)).max()) for w in weights) == (64 if reduce_range else 127)
    ours = np.concatenate([e.run(f) for f in tiny["feeds"]])
    ref = np.concatenate([_ort(tiny["fp32"], f) for f in tiny["feeds"]])
    assert _cosine(ours, ref) > 0.99


def test_check_names_the_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    assert ov_engine.check(_cfg()) == ["engine=openvino: the openvino package is not installed (pip install openvino)"]


def test_check_refuses_a_precision_the_cpu_lacks(monkeypatch):
    assert ov_engine.check(_cfg()) == [] and ov_engine.check(_cfg(inference_precision="f32")) == []
    monkeypatch.setattr(ov_engine, "cpu_capabilities", lambda: ["FP32", "INT8"])
    assert ov_engine.check(_cfg(inference_precision="bf16")) == [
        "engine.inference_precision: bf16 is not supported by OpenVINO on this CPU (OPTIMIZATION_CAPABILITIES: FP32, INT8); "
        "valid values here: auto, default, f32"
    ]


def test_engine_is_registered_and_its_config_validates():
    cfg = compose_cfg(["engine=openvino"])
    validate(cfg)
    assert cfg.engine.name == "openvino" and cfg.engine.inference_precision == "auto"
    kind = ENGINES["openvino"]()
    assert kind.build is ov_engine.build and kind.check(validate(cfg).engine) == []
    assert GRAPHS["openvino"]["int8"] == {"fp32": "model_fp32.onnx", "int8": "model_int8.onnx"}
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg(["engine=openvino", "engine.inference_precision=fp16"]))
    assert e.value.errors == ["engine.inference_precision: 'fp16' is not valid; valid values: auto, default, f32, bf16, f16"]


def test_weight_range_follows_the_cpu_flags():
    cfg = _cfg()
    assert ov_engine.weight_range_for(cfg, {"avx2", "fma"}, "x86_64")[0] == "reduced"
    assert ov_engine.weight_range_for(cfg, {"avx2", "avx512f"}, "x86_64")[0] == "reduced"
    for flag in ("avx_vnni", "avx512_vnni", "amx_int8"):
        assert ov_engine.weight_range_for(cfg, {"avx2", flag}, "x86_64") == (
            "full",
            f"x86 CPU with {flag}: OpenVINO's int8 dot products accumulate without saturation",
        )
    assert ov_engine.weight_range_for(cfg, set(), "aarch64")[0] == "full"
    with pytest.raises(ValueError):
        ov_engine.weight_range_for(engine_config("onnxruntime"))


def _capped_error(isa: str, weight_max: int) -> float:
    code = f"from pipeline.engines.openvino import qdq_linear_error as e; print(*e({weight_max}))"
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": isa}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    err, ref, primitive = r.stdout.split()
    assert "avx512" not in primitive and "amx" not in primitive, primitive  # the cap took effect
    return float(err) / float(ref)


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="the int16 saturation is an x86 effect")
def test_weight_range_measurement_full_range_saturates_without_vnni():
    """The measurement behind weight_range_for, on this machine's kernel and on AVX2 without VNNI."""
    err, ref, _ = ov_engine.qdq_linear_error(127)
    expected_here = ov_engine.weight_range_for(_cfg())[0]
    assert (err / ref > 0.05) == (expected_here == "reduced"), (err, ref, expected_here)
    assert _capped_error("AVX2", 127) > 0.05  # vpmaddubsw pairs saturate in int16
    assert _capped_error("AVX2", 64) < 1e-5  # 7-bit weights: exact


def test_engine_auto_follows_the_measured_rule(monkeypatch):
    from pipeline.engines import auto_engine

    assert auto_engine({"avx512_vnni", "amx_int8", "amx_bf16"})[0] == "openvino"
    chosen, why = auto_engine({"avx2", "avx512f", "avx512_vnni", "avx512_bf16"})  # AMD EPYC Zen 4 class: no AMX
    assert chosen == "openvino" and "avx512_vnni" in why and "1.41x" in why
    assert auto_engine({"avx2", "fma"})[0] == "onnxruntime"
    assert auto_engine({"avx2", "avx_vnni"})[0] == "onnxruntime"  # not measured: the engine measured there stays
    assert auto_engine(set())[0] == "onnxruntime"
    monkeypatch.setitem(sys.modules, "openvino", None)  # not installed: the engine that is
    chosen, why = auto_engine({"amx_int8"})
    assert chosen == "onnxruntime" and "not installed" in why


def test_engine_auto_is_resolved_before_any_stage_and_recorded(tmp_path, monkeypatch):
    import pipeline.run as run_module

    monkeypatch.setattr(run_module, "auto_engine", lambda: ("openvino", "test rule"))
    ctx = run_tiny(tmp_path, ["engine=auto", "qat=none", "benchmark=none", "export.tensorrt_graphs=false"])
    m = json.loads((ctx.run_dir / "metrics.json").read_text())
    assert m["engine_choice"] == {"asked": "auto", "chosen": "openvino", "why": "test rule"}
    assert set(m["quantization"]["engine_kernels"]) == {"fp32", "int8"}
    assert any(k.startswith("FullyConnected:") for k in m["quantization"]["engine_kernels"]["int8"])  # OpenVINO's layers
    assert m["quantization"]["weight_range"]["why"].find("OpenVINO") >= 0
    # CPU engine: Linear inputs asymmetric (uint8 with a zero point), run by OpenVINO's u8 kernels
    assert m["quantization"]["activations"]["resolved"] == "asymmetric"
    assert m["quantization"]["engine_kernels"]["int8"].get("FullyConnected:u8", 0) >= 12


def test_the_tuners_latency_probe_times_openvino(tmp_path):
    """tune=accuracy with engine=openvino: the probe exports and builds OpenVINO engines (the start timed
    against the FP32 baseline), as it does for ONNX Runtime."""
    over = ["engine=openvino", "tune=accuracy", "tune.calibrators=[max]", "tune.max_drop=100", "qat=none", "benchmark=none"]
    ctx = run_tiny(tmp_path, over + ["export.tensorrt_graphs=false", "tune.latency_warmup=1", "tune.latency_iters=2"])
    t = json.loads((ctx.run_dir / "metrics.json").read_text())["tune"]
    assert not t.get("latency_note") and t["start"]["latency_ratio"] > 0
    assert not (ctx.run_dir / ".tune_work").exists()  # the probe's engines and graphs are gone


def test_auto_float_layer_precision_follows_the_measured_rule():
    """auto: the plugin's bf16 on AMX CPUs, f32 elsewhere (as fast there, parity 98.24 % -> 99.22 %); explicit values pass."""
    assert ov_engine.float_layer_precision("auto", {"avx512_vnni", "amx_int8", "amx_bf16"})[0] is None
    hint, why = ov_engine.float_layer_precision("auto", {"avx512_vnni", "avx512_bf16"})
    assert hint == "f32" and "no AMX" in why
    assert ov_engine.float_layer_precision("auto", set())[0] == "f32"
    assert ov_engine.float_layer_precision("default", {"amx_bf16"})[0] is None
    assert ov_engine.float_layer_precision("bf16", set()) == ("bf16", "engine.inference_precision=bf16")
    # The NNCF peer keeps the plugin's own choice, as Optimum-Intel compiles it, whatever the run's engine uses.
    from pipeline.engines.peers import PEERS

    assert dict(PEERS["nncf_ptq"].settings) == {"inference_precision": "default"}
