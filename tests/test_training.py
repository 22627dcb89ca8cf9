"""The shared training loop: QAT / KD stages, and resume equivalence after an interruption."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import pipeline.stages._common as common
from pipeline.training import kd_loss
from tests.conftest import run_tiny

QAT = ["cache=off", "qat=default", "qat.max_steps=6", "qat.checkpoint_every=0", "finetune.max_steps=4", "qat.batch_size=8"]


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    full = run_tiny(tmp_path, QAT, name="full")
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
    assert json.loads((tmp_path / "cut/checkpoints/qat/progress.json").read_text())["step"] == 3

    resumed = run_tiny(tmp_path, QAT + [f"resume={tmp_path}/cut"], name="resumed")
    assert resumed.metrics.training["qat"]["resumed_from_step"] == 3
    assert resumed.metrics.training["qat"]["steps"] == full.metrics.training["qat"]["steps"] == 6
    assert resumed.metrics.training["qat"]["final_loss"] == full.metrics.training["qat"]["final_loss"]
    assert resumed.metrics.accuracy == full.metrics.accuracy and resumed.metrics.parity == full.metrics.parity
    a, b = load_file(str(tmp_path / "full/quantizers.safetensors")), load_file(str(tmp_path / "resumed/quantizers.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    wa = load_file(str(tmp_path / "full/checkpoints/qat/model.safetensors"))
    wb = load_file(str(tmp_path / "resumed/checkpoints/qat/model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


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
    assert (tmp_path / "run/loss_qat.png").exists() and (tmp_path / "run/checkpoints/qat/trainer_state.pt").exists()
    assert not any(isinstance(q.amax, torch.nn.Parameter) for q in ctx.quantizers.values())  # back to buffers for export
    assert ctx.metrics.accuracy["int8"] is not None


def test_kd_loss_reduces_to_cross_entropy_and_is_zero_kl_for_equal_logits():
    s = torch.randn(4, 3)
    y = torch.tensor([0, 1, 2, 1])
    ce = torch.nn.functional.cross_entropy(s, y)
    assert torch.allclose(kd_loss(s, torch.randn(4, 3), y, alpha=1.0, temperature=2.0), ce)
    assert torch.allclose(kd_loss(s, s, y, alpha=0.0, temperature=3.0), torch.tensor(0.0), atol=1e-6)
