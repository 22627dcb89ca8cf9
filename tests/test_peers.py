"""Peers (ONNX Runtime's own quantizers as comparison rows), the real-length benchmark row and the
optional ONNX Runtime transformer fusions of the INT8 graph."""

from __future__ import annotations

import json
import os
import re
import typing

import numpy as np
import pytest

from pipeline.engines import peers
from pipeline.inference import engine_logits
from pipeline.schema import BenchmarkConfig, ConfigError, engine_config
from pipeline.validation import validate
from tests.conftest import compose_cfg

ALL = "benchmark.peers=[" + ",".join(peers.PEERS) + "]"


def test_schema_lists_exactly_the_registered_peers():
    hint = typing.get_type_hints(BenchmarkConfig)["peers"]
    assert set(typing.get_args(typing.get_args(hint)[0])) == set(peers.PEERS)
    assert BenchmarkConfig().peers == list(peers.PEERS)  # all on by default
    assert compose_cfg().benchmark.peers == list(peers.PEERS)


def test_unknown_peer_is_named_with_the_valid_values():
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg(["benchmark.peers=[ort_dynamic,ort_qat]"]))
    assert "benchmark.peers[1]: 'ort_qat' is not valid; valid values: " + ", ".join(peers.PEERS) in str(e.value)


def test_every_peer_is_built_evaluated_and_timed_in_the_run(tiny_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # ONNX Runtime's quantizers must not leave files in the working folder
    # 4 calibration batches: quantize_static must use them all (with CalibMaxIntermediateOutputs=4 ONNX
    # Runtime 1.32 discarded them and failed with "No data is collected.").
    ctx = tiny_run([ALL, "data.num_calib=64", "calibration.num_batches=4"])
    m = json.loads((ctx.run_dir / "metrics.json").read_text())
    ours = {(r["batch"], r["seq"]) for r in m["benchmark"]["grid"]}
    # every peer but our own graph on the run's own engine (ONNX Runtime here)
    assert [p["name"] for p in m["peers"]] == [n for n in peers.PEERS if n != "int8_onnxruntime"]
    caps = _ov_capabilities()
    for p in m["peers"]:
        needs = {"ov_bf16": "BF16", "ov_fp16": "FP16"}.get(p["name"])
        if needs and needs not in caps:  # a CPU without bf16 / f16: a row saying so, not a mislabelled f32 row
            # "OpenVINO runs f32, not bf16" or, on a CPU with bf16 but no f16, "OpenVINO runs bf16, not f16"
            wanted = {"BF16": "bf16", "FP16": "f16"}[needs]
            assert re.match(rf"RuntimeError: OpenVINO runs \w+, not {wanted}\b", p["error"]) and p["grid"] == [], p
            continue
        assert p["error"] is None, p
        assert 0.0 <= p["accuracy"] <= 1.0
        assert {(r["batch"], r["seq"]) for r in p["grid"]} == ours and all(r["p50"] > 0 for r in p["grid"])
        assert p["real_length"]["pass_ms"] > 0 and (ctx.run_dir / p["file"]).exists()
    kernels = {p["name"]: p.get("kernels") or {} for p in m["peers"]}  # a failed row has none
    # What each peer really runs: int8 kernels for the quantized ones, fused attention for the fused one.
    assert kernels["ort_dynamic"].get("DynamicQuantizeMatMul", 0) + kernels["ort_dynamic"].get("MatMulIntegerToFloat", 0) > 0
    assert kernels["ort_dynamic_fused"].get("QAttention", 0) > 0
    assert kernels["ort_static"].get("QLinearMatMul", 0) + kernels["ort_static"].get("MatMulIntegerToFloat", 0) > 0
    assert not any(k.startswith(("Q", "DynamicQuantize", "MatMulInteger")) for k in kernels["ort_fp32_fused"])
    # NNCF's model on OpenVINO: every encoder Linear an int8 FullyConnected; the OpenVINO float rows none.
    assert sum(v for k, v in kernels["nncf_ptq"].items() if k.startswith("FullyConnected:") and k.endswith(("i8", "u8"))) >= 12
    assert not any(k.endswith((":i8", ":u8")) and k.startswith("FullyConnected") for k in kernels["ov_fp32"])
    assert kernels["ov_fp32"].get("FullyConnected:f32", 0) > 0
    # The speed claim against the fastest float engine timed at the headline shape.
    best = m["speedup_vs_best_float"]
    head = (m["benchmark"]["headline_batch"], m["benchmark"]["headline_seq"])
    floats = {
        p["name"]: r["p50"]
        for p in m["peers"]
        if p["precision"] in peers.FLOAT_PRECISIONS and not p["error"]
        for r in p["grid"]
        if (r["batch"], r["seq"]) == head
    }
    assert set(floats) <= set(best["candidates"]) and len(best["candidates"]) == len(floats) + 1
    assert best["p50"] == min(best["candidates"].values()) == best["candidates"][best["baseline"]]
    assert best["ratio"] == pytest.approx(best["p50"] / m["latency_ms"]["int8"]["p50"])
    # The FP32 peer is the same function as our FP32 engine: same decisions on the eval split.
    assert m["peers"][0]["accuracy"] == m["accuracy"]["engine_fp32"]
    report = (ctx.run_dir / "report.md").read_text()
    assert "## Peer comparison" in report and all(f"`{p['name']}`" in report for p in m["peers"])
    assert [f for f in os.listdir(tmp_path) if f.endswith(".data")] == []
    # Real-length row: the eval split's own lengths, dynamically padded batches of the headline size.
    real = m["benchmark"]["real_length"]
    assert set(real) == {"fp32", "int8"}
    lengths = [len(f["input_ids"]) for f in ctx.encoded["eval"].features]
    assert real["int8"]["examples"] == len(lengths) and real["int8"]["max_len"] == max(lengths)
    assert real["int8"]["mean_len"] == pytest.approx(float(np.mean(lengths)))


def test_a_peer_that_fails_to_build_is_a_row_with_its_error(tiny_run, monkeypatch):
    def broken(p):
        raise RuntimeError("unsupported op in this graph")

    monkeypatch.setitem(peers.PEERS, "ort_static", peers.Peer(broken, "int8", "broken on purpose"))
    ctx = tiny_run(["benchmark.peers=[ort_dynamic,ort_static]"])
    m = json.loads((ctx.run_dir / "metrics.json").read_text())
    by = {p["name"]: p for p in m["peers"]}
    assert by["ort_static"]["error"] == "RuntimeError: unsupported op in this graph" and by["ort_static"]["accuracy"] is None
    assert by["ort_static"]["grid"] == [] and by["ort_dynamic"]["error"] is None and by["ort_dynamic"]["grid"]
    assert "failed: RuntimeError: unsupported op in this graph" in (ctx.run_dir / "report.md").read_text()


def test_transformer_fusions_change_the_graph_not_the_numbers(tiny_run):
    ctx = tiny_run(["engine.transformer_fusions=true", "benchmark=none"])
    fused = ctx.engines["int8"]
    assert fused.files["fused_graph"].name == "model_int8.fused.onnx"
    from pipeline.engines.onnxruntime import OrtEngine, count_ops

    ops = count_ops(fused.files["fused_graph"])
    assert ops.get("SkipLayerNormalization", 0) > 0  # the fusion happened ...
    assert fused.kernels.get("MatMulIntegerToFloat", 0) + fused.kernels.get("QLinearMatMul", 0) > 0  # ... and GEMMs stay int8
    plain_cfg = engine_config("onnxruntime", None, transformer_fusions=False, save_optimized=False)
    plain = OrtEngine(ctx.artifacts.onnx["model_int8.onnx"], "int8", plain_cfg, ctx.run_dir)
    ev = ctx.encoded["eval"]
    a, b = engine_logits(fused, ctx.tokenizer, ev, 16), engine_logits(plain, ctx.tokenizer, ev, 16)
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_sweep_report_shows_each_jobs_peers(tmp_path):
    from pipeline.sweep_report import write_report

    job = tmp_path / "0"
    job.mkdir()
    (job / "manifest.json").write_text(json.dumps({"status": "done", "stages": {}}))
    grid = [{"batch": 8, "seq": 128, "precision": "int8", "p50": 1.0}]
    peers_rows = [
        {
            "name": "ort_dynamic",
            "accuracy": 0.8375,
            "error": None,
            "grid": [{"batch": 8, "seq": 128, "p50": 2.5}, {"batch": 1, "seq": 32, "p50": 0.1}],
        },
        {"name": "ort_static", "accuracy": None, "error": "RuntimeError: x", "grid": []},
    ]
    metrics = {
        "accuracy": {"fp32": 0.84, "int8": 0.84},
        "latency_ms": {},
        "benchmark": {"grid": grid, "headline_batch": 8, "headline_seq": 128},
    }
    (job / "metrics.json").write_text(json.dumps({**metrics, "peers": peers_rows}))
    rows = write_report(tmp_path)
    assert rows[0]["peers"] == "ort_dynamic=83.75%@2.50ms ort_static=failed"
    assert "- 0: ort_dynamic=83.75%@2.50ms ort_static=failed" in (tmp_path / "sweep_report.md").read_text()


def _fails_at_run(p: peers.PeerInputs):
    """A valid graph that raises in ONNX Runtime at run time, like MPNet's quantized bucket arithmetic did:
    the FP32 graph whose logits also depend on Gather(table of 2 rows, input_ids) (indices out of bounds)."""
    import onnx
    from onnx import TensorProto, helper

    m = onnx.load(str(p.fp32_onnx))
    out = m.graph.output[0].name
    m.graph.output[0].name = "logits_raw"
    for n in m.graph.node:
        n.output[:] = ["logits_raw" if o == out else o for o in n.output]
    m.graph.initializer.append(helper.make_tensor("bad_table", TensorProto.FLOAT, [2], [0.0, 0.0]))
    m.graph.node.extend(
        [
            helper.make_node("Gather", ["bad_table", "input_ids"], ["bad_g"]),
            helper.make_node("ReduceSum", ["bad_g"], ["bad_s"], axes=[1], keepdims=1)
            if m.opset_import[0].version < 13
            else helper.make_node("ReduceMax", ["bad_g"], ["bad_s"], keepdims=1),
            helper.make_node("Add", ["logits_raw", "bad_s"], [out]),
        ]
    )
    path = p.out_dir / "fails_at_run.onnx"
    onnx.save(m, str(path))
    return path


def test_a_peer_that_fails_at_evaluation_is_a_row_and_the_run_finishes(tiny_run, monkeypatch):
    monkeypatch.setitem(peers.PEERS, "ort_static", peers.Peer(_fails_at_run, "int8", "raises at run time on purpose"))
    ctx = tiny_run(["benchmark.peers=[ort_dynamic,ort_static]"])
    m = json.loads((ctx.run_dir / "metrics.json").read_text())
    by = {p["name"]: p for p in m["peers"]}
    assert by["ort_static"]["error"].startswith("evaluate: ") and "Gather" in by["ort_static"]["error"]
    assert by["ort_static"]["accuracy"] is None and by["ort_static"]["grid"] == [] and "real_length" not in by["ort_static"]
    # the other peer and our own engines are measured as usual
    assert by["ort_dynamic"]["error"] is None and by["ort_dynamic"]["grid"] and by["ort_dynamic"]["accuracy"] is not None
    assert m["accuracy"]["int8"] is not None and m["speedup"] is not None
    assert "failed: evaluate: " in (ctx.run_dir / "report.md").read_text()


def test_ort_static_quantizes_only_the_gemms(tiny_run):
    """Every activation Q/DQ pair of ort_static feeds a MatMul / Gemm (no quantized index arithmetic, which
    broke MPNet's relative-position buckets at run time; no quantized GEMM outputs)."""
    import onnx

    ctx = tiny_run(["benchmark.peers=[ort_static]"])
    g = onnx.load(str(ctx.run_dir / "peers" / "ort_static.onnx")).graph
    consumers: dict[str, set[str]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, set()).add(n.op_type)
    q_outputs = {n.output[0] for n in g.node if n.op_type == "QuantizeLinear"}
    activation_dq = [n.output[0] for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in q_outputs]
    assert activation_dq
    assert all(consumers.get(o, set()) & set(peers.STATIC_OPS) for o in activation_dq)


def _ov_capabilities() -> list[str]:
    from pipeline.engines.openvino import cpu_capabilities

    return cpu_capabilities()


def test_a_peer_far_below_the_baseline_gets_its_why_in_the_report():
    from pipeline.stages.report import peer_table

    grid = [{"batch": 8, "seq": 128, "precision": p, "p50": v} for p, v in (("fp32", 80.0), ("int8", 20.0))]
    row = {"description": "d", "error": None, "grid": [{"batch": 8, "seq": 128, "p50": 30.0}]}
    d = {
        "task": "sequence_classification",
        "benchmark": {"grid": grid, "headline_batch": 8, "headline_seq": 128},
        "accuracy": {"engine_fp32": 0.8375, "int8": 0.837},
        "engine_precisions": {"baseline": "fp32", "quantized": "int8"},
        "peers": [{**row, "name": "ort_static", "accuracy": 0.715}, {**row, "name": "ort_dynamic", "accuracy": 0.83}],
        "sequence_classification": {"ort_static": {"drop_pt": 12.25, "drop_ci95_pt": 1.61, "changed": 300, "n": 2000}},
    }
    text = "\n".join(peer_table(d))
    assert "**`ort_static` is 12.25 pt below the baseline engine** (paired 95 % interval ± 1.61 pt): MinMax ranges" in text
    assert "`ort_dynamic` is" not in text  # 0.75 pt below: within what a peer may lose without comment


def test_a_peer_that_is_the_runs_own_row_is_not_built_twice():
    """Our INT8 graph on the run's engine and, on engine=openvino, the f32 FP32 baseline are the run's own rows."""
    own = {e: sorted(n for n, p in peers.PEERS.items() if p.is_the_runs_own(e)) for e in ("onnxruntime", "openvino", "tensorrt")}
    assert own == {"onnxruntime": ["int8_onnxruntime"], "openvino": ["int8_openvino", "ov_fp32"], "tensorrt": []}
