"""The analysis scripts are thin command lines over package functions: they run on a tiny model and use the
package's slots and calibrator candidates."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

from pipeline.quantization.slots import layer_of, position, slot_of
from pipeline.testing import TINY, run_tiny

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_slots_name_bert_and_mpnet_positions():
    assert slot_of("bert.encoder.layer.3.output.dense.input_quantizer", "linear_input") == "FFN2 input (GELU out)"
    assert slot_of("bert.encoder.layer.11.attention.output.dense.input_quantizer", "linear_input") == "attn-out input"
    assert slot_of("encoder.encoder.layer.0.attention.attn.q.input_quantizer", "linear_input") == "QKV input (LN out)"
    assert slot_of("bert.encoder.layer.0.attention.self.attn_quant.probs", "attn_probs") == "attn P (softmax)"
    assert slot_of("classifier.input_quantizer", "linear_input") == "other (linear_input)"
    assert layer_of("bert.encoder.layer.11.output.dense.input_quantizer") == 11 and layer_of("classifier.input_quantizer") is None
    assert position("bert.encoder.layer.11.output.dense.input_quantizer") == "bert.encoder.layer.*.output.dense.input_quantizer"


def test_sensitivity_and_activation_ranges_run_on_a_tiny_model(tmp_path):
    out = tmp_path / "sens.json"
    rc = _script("sensitivity").main(
        ["--json", str(out), "--png", str(tmp_path / "sens.png"), "--no-only", "--variants-of", "QKV input (LN out)",
         "--methods", "mse", "max", "--alphas", "0.5", "--", *TINY, "calibration=percentile"]
    )  # fmt: skip
    assert rc == 0 and (tmp_path / "sens.png").stat().st_size > 0
    r = json.loads(out.read_text())
    assert {"QKV input (LN out)", "FFN2 input (GELU out)", "Linear weights", "attn P (softmax)"} <= set(r["slots"])
    variants = r["slot_variants"]["QKV input (LN out)"]
    assert set(variants) == {"mse", "max", "smoothing alpha 0.5"} and all(math.isfinite(v["kl"]) for v in variants.values())
    # max from the run's own histograms clips nothing: a different range, so a different KL than mse's.
    assert variants["max"]["kl"] != variants["mse"]["kl"]
    run = run_tiny(tmp_path, ["benchmark=none", "qat=none", "calibration=percentile"]).run_dir
    ranges = tmp_path / "ranges.json"
    assert _script("activation_ranges").main([str(run), "--json", str(ranges), "--png", str(tmp_path / "r.png")]) == 0
    summary = json.loads(ranges.read_text())["summary"]
    assert "QKV input (LN out)" in summary and all(math.isfinite(v["sqnr_db_mean"]) for v in summary.values())
