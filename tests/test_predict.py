"""The predictor (pipeline/deploy/): tokenization equal to the pipeline's, predictions equal to the evaluate
stage's engine outputs on the eval split, the CLI, and the deploy stage's Triton repository on disk."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

from pipeline.deploy.postprocess import POSTPROCESS
from pipeline.deploy.predictor import Predictor, eval_records, from_run_folder, load_predictor, run_tokenizer
from pipeline.deploy.textproc import Example, TextProcessor
from pipeline.inference import engine_logits
from pipeline.schema import validate
from pipeline.tasks import make_task
from pipeline.testing import TINY, compose_cfg, run_tiny

NAMES = ["input_ids", "attention_mask", "token_type_ids"]


@pytest.mark.parametrize("task", ["sequence_classification", "token_classification", "question_answering"])
def test_textproc_encodes_token_for_token_as_the_pipeline(task):
    """tokenizers alone (what the server runs) == the task's Hugging Face encoding and tokenizer.pad."""
    cfg = validate(compose_cfg([f"task={task}", "model.max_length=64", "benchmark=none", "data.num_eval=300"]))
    t = make_task(cfg)
    ev = t.load_splits(cfg.data).eval
    tok = run_tokenizer(cfg)
    enc = t.encode(tok, ev, 64)
    tp = TextProcessor.from_hf(tok, 64, NAMES)
    if task == "sequence_classification":
        ex = tp.encode(ev.texts)
    elif task == "token_classification":
        ex = tp.encode_words([" ".join(words) for words in ev.texts])
    else:
        ex = tp.encode_qa(ev.questions, ev.contexts, cfg.task.doc_stride)
        assert [o for e in ex for o in e.offsets] == [list(o) for o in enc.offsets]
    feats = [w for e in ex for w in e.windows]
    assert feats == enc.features
    ours, theirs = tp.pad(feats[:9]), tok.pad(enc.features[:9], return_tensors="np")
    assert all(np.array_equal(ours[k], theirs[k]) for k in NAMES)
    if task == "sequence_classification":  # longer than max_length: cut as the pipeline cuts, and said so
        (long,) = tp.encode(["word " * 5000])
        assert len(long.windows[0]["input_ids"]) == 64 and long.truncated
        assert long.windows[0]["input_ids"] == tok("word " * 5000, truncation=True, max_length=64)["input_ids"]


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory):
    """One tiny sequence-classification run shared by this module's tests (none of them writes into it
    but the deploy-stage test, which runs last)."""
    return run_tiny(tmp_path_factory.mktemp("cls"))


def _eval_engine_outputs(run_dir: Path, predictor: Predictor):
    """The evaluate stage's way: the task's encoding, length-sorted batches of evaluate.batch_size."""
    cfg, _ = from_run_folder(run_dir)
    task = make_task(cfg)
    split = task.load_splits(cfg.data)
    enc = task.encode(run_tokenizer(cfg), split.eval, cfg.model.max_length)
    ref = engine_logits(predictor.engine, run_tokenizer(cfg), enc, cfg.evaluate.batch_size, token_level=task.token_level)
    return cfg, task, split, enc, ref


def test_predictions_on_the_eval_split_equal_the_evaluate_stage(cls_run):
    ctx = cls_run
    for precision in ("int8", "fp32"):
        p = load_predictor(ctx.run_dir, precision)
        cfg, task, split, enc, ref = _eval_engine_outputs(ctx.run_dir, p)
        records = eval_records(cfg)
        results = p.predict(records)
        labels = np.array([r["label_id"] for r in results])
        assert np.array_equal(labels, ref.argmax(-1))  # same decisions
        assert np.array_equal(np.stack([o[0] for o in p.outputs(p.encode(records))]), ref)  # same batches: same bits
        metrics = json.loads((ctx.run_dir / "metrics.json").read_text())
        key = "int8" if precision == "int8" else "engine_fp32"
        assert float((labels == np.array(split.eval.labels)).mean()) == metrics["accuracy"][key]
        assert {r["label"] for r in results} <= set(split.label_names)
        assert all(abs(sum(r["scores"]) - 1) < 1e-6 for r in results)


def test_embedding_predictions_are_the_normalized_engine_vectors(tiny_run):
    ctx = tiny_run(["task=embedding"], name="emb")
    p = load_predictor(ctx.run_dir)
    cfg, *_, ref = _eval_engine_outputs(ctx.run_dir, p)
    vecs = np.array([r["embedding"] for r in p.predict(eval_records(cfg))])
    expected = ref / np.linalg.norm(ref, axis=-1, keepdims=True)
    np.testing.assert_allclose(vecs, expected, atol=1e-6)


def test_token_classification_entities_follow_the_word_tags(tiny_run):
    ctx = tiny_run(["task=token_classification"], name="ner")
    p = load_predictor(ctx.run_dir)
    cfg, task, split, enc, ref = _eval_engine_outputs(ctx.run_dir, p)
    records = eval_records(cfg, 40)
    results = p.predict(records)
    from pipeline.tasks.token_classification import word_predictions

    for i, (r, rec) in enumerate(zip(results, records)):
        tags = [task.tag_names[k] for k in word_predictions(ref[i], enc.labels[i])]
        begins = sum(1 for j, t in enumerate(tags) if t.startswith("B-") or (t.startswith("I-") and (j == 0 or tags[j - 1][2:] != t[2:])))
        assert len(r["entities"]) == begins
        for e in r["entities"]:
            assert rec["text"][e["start"] : e["end"]] == e["text"] and e["text"].strip() == e["text"]


def test_question_answering_answers_equal_the_task_decoding(tiny_run):
    ctx = tiny_run(["task=question_answering", "model.max_length=64", "benchmark.seq_lens=[16,32]"], name="qa")
    p = load_predictor(ctx.run_dir)
    cfg, task, split, enc, ref = _eval_engine_outputs(ctx.run_dir, p)
    results = p.predict(eval_records(cfg))
    assert [r["answer"] for r in results] == task.predictions(ref, enc)
    for r, ctx_text in zip(results, split.eval.contexts):
        if r["start"] is not None:
            assert ctx_text[r["start"] : r["end"]] == r["answer"]


def test_predict_cli_reads_text_and_jsonl_and_never_writes_into_the_run(cls_run, tmp_path, monkeypatch, capsys):
    from pipeline import predict

    ctx = cls_run
    before = {p: p.stat().st_mtime_ns for p in ctx.run_dir.rglob("*")}
    lines = [
        "a gorgeous, witty, seductive movie.",
        json.dumps({"text": "dull and lifeless"}),
        "",
        json.dumps({"question": "x"}),
        "x " * 400,
    ]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    assert predict.main([str(ctx.run_dir), "--precision", "fp32"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(out) == len(lines)
    assert set(out[0]) == {"label", "label_id", "scores"} and "label" in out[1]
    assert out[2] == {"error": "empty 'text'"} and "missing 'text'" in out[3]["error"]
    assert out[4]["truncated"] is True
    src = tmp_path / "in.txt"
    src.write_text("great\nterrible\n")
    assert predict.main([str(ctx.run_dir), str(src), "-o", str(tmp_path / "out.jsonl")]) == 0
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 2
    assert {p: p.stat().st_mtime_ns for p in ctx.run_dir.rglob("*")} == before  # nothing added or touched
    assert predict.main([str(tmp_path), str(src)]) == 2  # not a run folder: a clear error


def test_postprocess_entities_and_scores():
    meta = {"label_names": ["O", "B-PER", "I-PER", "B-LOC"]}
    text = "with maria lopez in paris"
    # tokens: [CLS] with maria lo ##pez in paris [SEP] -> words 0 1 2 2 3 4
    word_ids = [-1, 0, 1, 2, 2, 3, 4, -1]
    logits = np.full((8, 4), -5.0)
    for t, k in enumerate([0, 0, 1, 2, 0, 0, 3, 0]):  # lo -> I-PER, ##pez ignored (not a first sub-token)
        logits[t, k] = 5.0
    from pipeline.deploy.textproc import split_words

    ex = Example([], text=text, word_ids=[word_ids], word_spans=split_words(text)[1])
    ents = POSTPROCESS["token_classification"](logits, ex, meta)["entities"]
    assert [(e["entity"], e["text"]) for e in ents] == [("PER", "maria lopez"), ("LOC", "paris")]
    r = POSTPROCESS["sequence_classification"](np.array([0.0, 2.0]), None, {"label_names": ["negative", "positive"]})
    assert r["label"] == "positive" and r["label_id"] == 1 and np.isclose(sum(r["scores"]), 1)


def test_deploy_stage_writes_the_repository_once(cls_run):
    import pipeline.stages.deploy as deploy

    ctx = cls_run
    cfg = validate(compose_cfg([*TINY, "deploy=triton"]))  # the run's config, deploy at its defaults (deploy=triton)
    deploy.run(cfg, ctx)
    repo = ctx.run_dir / "triton"
    info = json.loads((repo / "deploy.json").read_text())
    assert info["task"] == "sequence_classification" and info["meta"]["label_names"] == ["negative", "positive"]
    assert set(info["repositories"]["cpu"]) == {"sequence_classification", "sequence_classification_fp32"}
    assert {"sequence_classification_openvino", "sequence_classification_openvino_fp32"} <= set(info["repositories"]["nvidia"])
    # weights are hard links to the run's graphs, not copies
    assert os.path.samefile(repo / "cpu" / "model_int8" / "1" / "model.onnx", ctx.run_dir / "model_int8.onnx")
    assert 'backend: "onnxruntime"' in (repo / "nvidia" / "model_int8" / "config.pbtxt").read_text()
    ens = (repo / "cpu" / "sequence_classification" / "config.pbtxt").read_text()
    assert 'name: "TEXT" data_type: TYPE_STRING dims: [ 1 ]' in ens and 'name: "label" data_type: TYPE_STRING' in ens
    settings = json.loads((repo / "cpu" / "tokenizer" / "1" / "textproc.json").read_text())
    assert settings["max_length"] == cfg.model.max_length and settings["input_names"] == NAMES
    with pytest.raises(FileExistsError):
        deploy.run(cfg, ctx)  # never over an existing repository
    assert not [p for p in ctx.run_dir.iterdir() if p.name.startswith(".triton")]  # no temporary folder left


def test_a_run_made_with_engine_auto_predicts_on_the_engine_it_resolved_to(cls_run, tmp_path):
    """config.resolved.yaml keeps engine.name=auto; the predictor must use what the run measured (metrics.json
    engine_choice), never look up an engine called "auto"."""
    from omegaconf import OmegaConf

    from pipeline.deploy.predictor import load_run_config

    raw = OmegaConf.load(cls_run.run_dir / "config.resolved.yaml")
    raw.engine.name = "auto"
    OmegaConf.save(raw, tmp_path / "config.resolved.yaml")
    (tmp_path / "metrics.json").write_text(json.dumps({"engine_choice": {"asked": "auto", "chosen": "openvino", "why": "t"}}))
    assert load_run_config(tmp_path).engine.name == "openvino"
    (tmp_path / "metrics.json").unlink()  # an unfinished run: the rule engine=auto applies on this machine
    from pipeline.engines import auto_engine

    assert load_run_config(tmp_path).engine.name == auto_engine()[0]
