"""Model loading accounts for every weight: a fresh task head is fine, a wrong checkpoint is refused
with the list of keys unless model.allow_partial_load=true, and the manifest records what was
re-initialized."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, BertModel

from pipeline import _embedded_model_path
from pipeline.models import CheckpointError, load_model
from pipeline.validation import validate
from tests.conftest import TINY, compose_cfg, run_tiny

# Stages after load switched off: these tests are about what load accepts.
LOAD_ONLY = ["finetune=none", "calibration=none", "qat=none", "export=none", "engine=none", "benchmark=none", "evaluate.enabled=false"]
DROPPED = ["encoder.layer.0.attention.self.query.weight", "encoder.layer.1.output.dense.bias"]


def _save_checkpoint(folder: Path, model: torch.nn.Module) -> Path:
    """A local checkpoint folder as users have them: weights (safetensors), config, tokenizer."""
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(_embedded_model_path()).save_pretrained(folder)
    return folder


def _tiny_config() -> BertConfig:
    return BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def encoder_ckpt(tmp_path_factory) -> Path:
    """A sentence-embedding style checkpoint (BertModel: no task head, keys without the `bert.` prefix)."""
    torch.manual_seed(0)
    return _save_checkpoint(tmp_path_factory.mktemp("encoder"), BertModel(_tiny_config()))


@pytest.fixture(scope="module")
def broken_ckpt(tmp_path_factory, encoder_ckpt) -> Path:
    """The same checkpoint with two encoder weights removed from its safetensors file."""
    folder = tmp_path_factory.mktemp("broken")
    for f in encoder_ckpt.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    weights = load_file(folder / "model.safetensors")
    for key in DROPPED:
        del weights[key]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _model_cfg(overrides: list[str]):
    return validate(compose_cfg(overrides)).model


def test_embedded_checkpoint_loads_with_only_a_fresh_head(caplog):
    with caplog.at_level(logging.INFO, logger="pipeline.models"):
        loaded = load_model(_model_cfg([]), 2, torch.device("cpu"))
    r = loaded.report
    # all-MiniLM-L6-v2 ships its pooler: only the classification head is new.
    assert (r.reinitialized, r.head, r.partial, r.unexpected) == (["classifier.bias", "classifier.weight"],) * 2 + ([], [])
    assert not loaded.head_trained
    assert "load: task head initialized fresh (not in the checkpoint): classifier.bias, classifier.weight" in caplog.messages


def test_mlm_checkpoint_head_and_pooler_are_expected(tmp_path):
    """bert-base-uncased-like: a pretraining head the classifier does not use, no pooler: not an error."""
    torch.manual_seed(0)
    folder = _save_checkpoint(tmp_path / "mlm", BertForMaskedLM(_tiny_config()))
    loaded = load_model(_model_cfg([f"model.name_or_path={folder}"]), 2, torch.device("cpu"))
    r = loaded.report
    assert r.partial == [] and not loaded.head_trained
    assert set(r.reinitialized) == {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"}
    assert r.unexpected and all(k.startswith("cls.predictions.") for k in r.unexpected)
    assert set(r.head) == set(r.reinitialized) | set(r.unexpected)


def test_missing_encoder_weights_are_refused_with_the_keys(tmp_path, broken_ckpt):
    with pytest.raises(CheckpointError) as e:
        run_tiny(tmp_path, ["model.random_init=false", f"model.name_or_path={broken_ckpt}", *LOAD_ONLY])
    assert e.value.errors == [f"missing: bert.{k}" for k in DROPPED]
    assert str(e.value) == (
        f"model.name_or_path: {broken_ckpt} does not fit BertForSequenceClassification: 2 backbone weights are missing, "
        "mis-shaped or unused (model.allow_partial_load=true re-initializes them at random):\n"
        "  - missing: bert.encoder.layer.0.attention.self.query.weight\n"
        "  - missing: bert.encoder.layer.1.output.dense.bias"
    )
    assert json.loads((tmp_path / "run/manifest.json").read_text())["status"] == "failed"


def test_allow_partial_load_proceeds_and_the_manifest_lists_what_was_reinitialized(tmp_path, broken_ckpt):
    ctx = run_tiny(tmp_path, ["model.random_init=false", f"model.name_or_path={broken_ckpt}", "model.allow_partial_load=true", *LOAD_ONLY])
    assert ctx.stages["load"].status == "done"
    m = json.loads((tmp_path / "run/manifest.json").read_text())["model_load"]
    assert m["reinitialized"] == sorted([f"bert.{k}" for k in DROPPED] + ["classifier.bias", "classifier.weight"])
    assert m["partial"] == [f"missing: bert.{k}" for k in DROPPED]
    assert m["head"] == ["classifier.bias", "classifier.weight"] and m["unexpected"] == [] and m["random_init"] is False


def test_weights_that_do_not_fit_the_configured_architecture_are_refused(tmp_path, encoder_ckpt):
    """config.json says intermediate_size 48, the weights are 64 wide: every FFN weight is mis-shaped."""
    folder = tmp_path / "misfit"
    folder.mkdir()
    for f in encoder_ckpt.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    with pytest.raises(CheckpointError) as e:
        load_model(_model_cfg([f"model.name_or_path={folder}"]), 2, torch.device("cpu"))
    shapes = {"intermediate.dense.bias": "(64,) vs model (48,)", "intermediate.dense.weight": "(64, 32) vs model (48, 32)"}
    shapes["output.dense.weight"] = "(32, 64) vs model (32, 48)"
    assert e.value.errors == [f"mismatched: bert.encoder.layer.{i}.{k}: checkpoint {v}" for i in (0, 1) for k, v in sorted(shapes.items())]


def test_cli_wrong_checkpoint_exits_2_without_traceback(tmp_path, broken_ckpt):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    args = [*TINY, "model.random_init=false", f"model.name_or_path={broken_ckpt}", *LOAD_ONLY, f"hydra.run.dir={tmp_path}/run"]
    r = subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert "  - missing: bert.encoder.layer.0.attention.self.query.weight\n  - missing: bert.encoder.layer.1.output.dense.bias" in r.stderr
