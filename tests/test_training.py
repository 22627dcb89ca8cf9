"""The shared training loop: QAT / KD stages, and resume equivalence after an interruption."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import pipeline
import pipeline.stages._common as common
import pipeline.training as training
from pipeline.testing import run_tiny
from pipeline.training import ResumeError, kd_loss, latest_checkpoint

QAT = ["cache=off", "qat=default", "qat.max_steps=6", "qat.checkpoint_every=0", "finetune.max_steps=4", "qat.batch_size=8"]


def _ckpt(run_dir, stage="qat"):
    return latest_checkpoint(run_dir / "checkpoints" / stage)


@pytest.fixture(scope="module")
def full_qat(tmp_path_factory):
    """The uninterrupted reference run every resumed run must reproduce bit for bit."""
    tmp = tmp_path_factory.mktemp("full")
    return tmp / "full", run_tiny(tmp, QAT, name="full")


def _assert_same_training(resumed, full_dir, full, resumed_dir):
    assert resumed.metrics.training["qat"]["steps"] == full.metrics.training["qat"]["steps"] == 6
    assert resumed.metrics.training["qat"]["final_loss"] == full.metrics.training["qat"]["final_loss"]
    assert resumed.metrics.accuracy == full.metrics.accuracy and resumed.metrics.parity == full.metrics.parity
    a, b = load_file(str(full_dir / "quantizers.safetensors")), load_file(str(resumed_dir / "quantizers.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    wa, wb = load_file(str(_ckpt(full_dir) / "model.safetensors")), load_file(str(_ckpt(resumed_dir) / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path, monkeypatch, full_qat):
    real = common.train

    def interrupted(*args, **kwargs):
        if kwargs.get("desc") == "qat":
            real(*args, stop_after=3, **kwargs)  # writes a checkpoint at step 3, as checkpoint_every would
            raise KeyboardInterrupt("simulated interruption")
        return real(*args, **kwargs)

    monkeypatch.setattr(common, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_tiny(tmp_path, QAT, name="cut")
    monkeypatch.setattr(common, "train", real)
    assert json.loads((tmp_path / "cut/manifest.json").read_text())["status"] == "failed"
    assert _ckpt(tmp_path / "cut").name == "step-00000003"

    resumed = run_tiny(tmp_path, QAT + [f"resume={tmp_path}/cut"], name="resumed")
    assert resumed.metrics.training["qat"]["resumed_from_step"] == 3
    _assert_same_training(resumed, *full_qat, tmp_path / "resumed")


def test_a_crash_between_checkpoint_files_never_resumes_from_a_mixed_checkpoint(tmp_path, monkeypatch, full_qat):
    """Kill the writer of the step-4 checkpoint after its weights are written (before the optimizer and
    RNG state): resume must continue from step 2 with step-2 weights, and a hand-mixed folder is refused."""
    real_save, real_rmtree = training.save_file, shutil.rmtree

    def dies_after_the_weights(tensors, path, metadata=None):
        if metadata == {"step": "4"} and Path(path).name == "trainer_state.safetensors" and "checkpoints/qat/" in str(path):
            raise KeyboardInterrupt("killed while writing the step-4 checkpoint")
        return real_save(tensors, path, metadata=metadata)

    # A killed process runs no cleanup: keep the half-written temp folder as it would be left on disk.
    monkeypatch.setattr(training, "save_file", dies_after_the_weights)
    monkeypatch.setattr(shutil, "rmtree", lambda p, *a, **k: None if Path(p).name.startswith(".step-") else real_rmtree(p, *a, **k))
    ckpt = QAT + ["qat.checkpoint_every=2"]
    with pytest.raises(KeyboardInterrupt):
        run_tiny(tmp_path, ckpt, name="crash")
    monkeypatch.undo()
    folder = tmp_path / "crash/checkpoints/qat"
    leftover = [p.name for p in folder.iterdir() if p.name.startswith(".")]
    assert len(leftover) == 1 and leftover[0].startswith(".step-00000004.")
    assert (folder / leftover[0] / "model.safetensors").exists() and not (folder / leftover[0] / "trainer_state.safetensors").exists()
    assert _ckpt(tmp_path / "crash").name == "step-00000002"

    resumed = run_tiny(tmp_path, ckpt + [f"resume={tmp_path}/crash"], name="resumed")
    assert resumed.metrics.training["qat"]["resumed_from_step"] == 2
    _assert_same_training(resumed, *full_qat, tmp_path / "resumed")

    # Step-4 weights copied over the step-2 checkpoint by hand: the step numbers disagree -> refused.
    shutil.copy(folder / leftover[0] / "model.safetensors", folder / "step-00000002" / "model.safetensors")
    with pytest.raises(ResumeError) as e:
        run_tiny(tmp_path, ckpt + [f"resume={tmp_path}/crash"], name="mixed")
    assert str(e.value) == (
        f"resume: checkpoint {folder}/step-00000002 mixes training steps (model.safetensors: 4, trainer_state.safetensors: 2, "
        "trainer_state.json: 2; folder says 00000002); refusing to resume from it"
    )


def test_no_pickle_is_ever_loaded_by_the_product():
    """Resume folders come from users: loading a pickle from one would run arbitrary code."""
    root = Path(pipeline.__file__).resolve().parent
    offenders = [
        f"{f.relative_to(root)}:{n}: {line.strip()}"
        for f in sorted(root.rglob("*.py"))
        for n, line in enumerate(f.read_text().splitlines(), 1)
        if re.search(r"weights_only\s*=\s*False|pickle\.loads?\(|torch\.load\(|allow_pickle\s*=\s*True|import pickle|cloudpickle", line)
    ]
    assert offenders == []


def test_resume_refuses_a_different_config(tmp_path):
    from pipeline.schema import ConfigError

    run_tiny(tmp_path, QAT, name="first")
    with pytest.raises(ConfigError, match=r"resume: .* was run with a different config"):
        run_tiny(tmp_path, QAT + ["qat.lr=3e-5", f"resume={tmp_path}/first"], name="second")
    assert not (tmp_path / "second").exists()


def test_qat_and_kd_stages_run_and_record(tmp_path):
    ctx = run_tiny(
        tmp_path, ["qat=kd", "qat.max_steps=3", "finetune.max_steps=2", "qat.learn_amax=true", "benchmark=none", "qat.eval_each_epoch=true"]
    )
    assert ctx.stages["qat"].status == "done" and ctx.metrics.training["qat"]["steps"] == 3
    # 64 examples / batch 32 = 2 steps per epoch: 3 steps span 2 epochs, each followed by a fake-quant eval
    assert [e["epoch"] for e in ctx.metrics.training["qat"]["epoch_eval"]] == [1, 2]
    assert all(0 <= e["accuracy"] <= 1 for e in ctx.metrics.training["qat"]["epoch_eval"])
    assert (tmp_path / "run/loss_qat.png").exists() and _ckpt(tmp_path / "run").name == "step-00000003"
    assert not any(isinstance(q.amax, torch.nn.Parameter) for q in ctx.quantizers.values())  # back to buffers for export
    assert ctx.metrics.accuracy["int8"] is not None


def test_kd_loss_reduces_to_cross_entropy_and_is_zero_kl_for_equal_logits():
    s = torch.randn(4, 3)
    y = torch.tensor([0, 1, 2, 1])
    ce = torch.nn.functional.cross_entropy(s, y)
    assert torch.allclose(kd_loss(s, torch.randn(4, 3), y, alpha=1.0, temperature=2.0), ce)
    assert torch.allclose(kd_loss(s, s, y, alpha=0.0, temperature=3.0), torch.tensor(0.0), atol=1e-6)


def _tiny_classifiers():
    """One tiny random-weight classifier per encoder family, dropout 0.5 everywhere it can be set."""
    import transformers as tf

    common = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    drop = dict(hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5)
    configs = {
        "bert": tf.BertConfig(**common, **drop),
        "roberta": tf.RobertaConfig(**common, **drop),
        "albert": tf.AlbertConfig(**common, embedding_size=8, **drop),
        "electra": tf.ElectraConfig(**common, embedding_size=8, **drop),
        "mpnet": tf.MPNetConfig(**common, **drop),
        "deberta_v2": tf.DebertaV2Config(**common, **drop, relative_attention=True, pos_att_type=["c2p", "p2c"]),
        "distilbert": tf.DistilBertConfig(vocab_size=64, dim=16, n_layers=2, n_heads=2, hidden_dim=32, dropout=0.5, attention_dropout=0.5),
        "modernbert": tf.ModernBertConfig(
            **common,
            attention_dropout=0.5,
            mlp_dropout=0.5,
            embedding_dropout=0.5,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            cls_token_id=1,
            sep_token_id=2,
        ),
    }
    for name, config in configs.items():
        torch.manual_seed(0)
        yield name, tf.AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")


def test_without_dropout_training_mode_computes_the_eval_function_and_restores_the_rates():
    """qat.dropout=false: in training mode every family computes exactly what it computes in eval mode (the
    FP32 teacher's function), and its dropout works again after the block."""
    ids = torch.randint(1, 64, (4, 12))
    for name, model in _tiny_classifiers():
        model.eval()
        with torch.no_grad():
            ref = model(input_ids=ids).logits
            model.train()
            with training.without_dropout(model):
                off = model(input_ids=ids).logits
            on = model(input_ids=ids).logits
        assert torch.allclose(off, ref, atol=1e-6), name
        assert not torch.allclose(on, ref, atol=1e-3), name  # the rates are back


def test_qat_dropout_setting_reaches_the_training_loop(monkeypatch, tmp_path):
    seen, real = [], training._train

    def spy(model, *a, **k):
        seen.append(sorted({m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}))
        return real(model, *a, **k)

    monkeypatch.setattr(training, "_train", spy)
    run_tiny(tmp_path, ["cache=off", "tune=none", "qat=default", "qat.max_steps=2", "qat.dropout=false", "finetune.max_steps=2",
                        "benchmark=none", "deploy=none"], name="drop")  # fmt: skip
    assert seen[0] != [0.0] and seen[1] == [0.0]  # finetune with its dropout, QAT without
