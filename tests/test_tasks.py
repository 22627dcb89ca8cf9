"""Tasks (pipeline/tasks/, conf/task/): pooling, neighbour metrics, config rules, one tiny end-to-end run per task."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from pipeline import _embedded_model_path
from pipeline.data.batching import IGNORE, Encoded
from pipeline.schema import ConfigError
from pipeline.tasks.embedding import knn_accuracy, neighbours, pool, read_sentence_transformers_pooling, recall_at_k
from pipeline.tasks.question_answering import (
    SYNTH_QUESTIONS,
    QASplit,
    QuestionAnswering,
    answer_tokens,
    decode,
    normalize_answer,
    squad_scores,
    synthetic_qa,
)
from pipeline.tasks.token_classification import (
    SYNTH_ENTITIES,
    SYNTH_TAGS,
    TokenClassification,
    align_labels,
    synthetic_ner,
    word_predictions,
)
from pipeline.testing import CONF, TINY, compose_cfg, run_tiny
from pipeline.validation import validate

TASKS = sorted(p.stem for p in (CONF / "task").glob("*.yaml"))

# ---------------------------------------------------------------------------------------------
# embedding: pooling as sentence-transformers defines it (models/Pooling.py, models/Normalize.py)

# Two sentences, 3 positions, hidden 2; the second sentence has one padding position.
HIDDEN = torch.tensor([[[1.0, 2.0], [3.0, -4.0], [5.0, 0.0]], [[2.0, 2.0], [-6.0, 1.0], [100.0, 100.0]]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def test_mean_pooling_averages_only_real_tokens():
    # sentence 1: ((1+3+5)/3, (2-4+0)/3) = (3, -2/3); sentence 2: ((2-6)/2, (2+1)/2) = (-2, 1.5): the padded 100s ignored
    expected = torch.tensor([[3.0, -2.0 / 3.0], [-2.0, 1.5]])
    assert torch.allclose(pool(HIDDEN, MASK, "mean", normalize=False), expected)


def test_cls_and_max_pooling():
    assert torch.equal(pool(HIDDEN, MASK, "cls", normalize=False), torch.tensor([[1.0, 2.0], [2.0, 2.0]]))
    # max over real tokens only: sentence 2's padding (100, 100) must not win
    assert torch.equal(pool(HIDDEN, MASK, "max", normalize=False), torch.tensor([[5.0, 2.0], [2.0, 2.0]]))


def test_normalize_divides_by_the_l2_norm():
    # mean of sentence 2 = (-2, 1.5): norm 2.5 -> (-0.8, 0.6)
    out = pool(HIDDEN, MASK, "mean", normalize=True)
    assert torch.allclose(out[1], torch.tensor([-0.8, 0.6]))
    assert torch.allclose(out.norm(dim=1), torch.ones(2))


def test_pooling_is_read_from_the_checkpoint_folder(tmp_path):
    embedded = read_sentence_transformers_pooling(_embedded_model_path())  # all-MiniLM-L6-v2: mean + Normalize
    assert (embedded.mode, embedded.normalize) == ("mean", True)
    assert read_sentence_transformers_pooling(tmp_path) is None  # a plain checkpoint: no modules.json
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "modules.json").write_text(json.dumps([{"path": "", "type": "x.Transformer"}, {"path": "1_Pooling", "type": "x.Pooling"}]))
    (tmp_path / "1_Pooling/config.json").write_text(json.dumps({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    assert (read_sentence_transformers_pooling(tmp_path).mode, read_sentence_transformers_pooling(tmp_path).normalize) == ("cls", False)
    (tmp_path / "1_Pooling/config.json").write_text(json.dumps({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True}))
    with pytest.raises(ValueError, match=r"pooling \['cls', 'mean'\] is not supported"):
        read_sentence_transformers_pooling(tmp_path)


def test_neighbour_metrics_on_a_hand_made_corpus():
    # Four points on a circle: 0 and 1 close together, 2 and 3 close together, the pairs far apart.
    e = np.array([[1.0, 0.0], [0.99, 0.14], [-1.0, 0.05], [-0.98, -0.2]])
    assert neighbours(e, 1)[:, 0].tolist() == [1, 0, 3, 2]
    assert knn_accuracy(e, [0, 0, 1, 1], k=1) == 1.0
    assert knn_accuracy(e, [0, 1, 0, 1], k=1) == 0.0
    swapped = e[[0, 1, 3, 2]]  # rows 2 and 3 exchanged: their nearest neighbours are each other still
    assert recall_at_k(e, swapped, 1) == 1.0
    moved = e.copy()
    moved[1] = [-1.0, 0.0]  # point 1 now sits with 2 and 3: nearest neighbours 3, 2, 1, 1 instead of 1, 0, 3, 2
    assert neighbours(moved, 1)[:, 0].tolist() == [3, 2, 1, 1] and recall_at_k(e, moved, 1) == 0.0
    assert recall_at_k(e, moved, 3) == 1.0  # k = every other point: always the same set


# ---------------------------------------------------------------------------------------------
# Config: every task composes with every calibration / QAT / engine option; the task's own rules


def _option_overrides():
    for group in ("calibration", "qat", "engine"):
        for f in sorted((CONF / group).glob("*.yaml")):
            # calibration=none: nothing to train or smooth (task=embedding smooths by default).
            extra = {("calibration", "none"): ["qat=none", "smoothing=none"], ("engine", "none"): ["benchmark=none"]}.get(
                (group, f.stem), []
            )
            yield [f"{group}={f.stem}", *extra]


@pytest.mark.parametrize("task", TASKS)
def test_every_task_composes_with_every_calibration_qat_and_engine_option(task):
    for overrides in _option_overrides():
        cfg = validate(compose_cfg([f"task={task}", *overrides]))
        assert cfg.task.name == task


def test_embedding_defaults_to_no_finetune_and_refuses_one():
    assert validate(compose_cfg(["task=embedding"])).finetune.enabled is False
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg(["task=embedding", "finetune=default"]))
    assert e.value.errors == [
        "finetune: task=embedding uses the checkpoint's own embedding and has no labelled training objective; "
        "finetune=default cannot be combined with it (choose finetune=none, the task's default)"
    ]
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg(["task=embedding", "task.pooling=avg"]))
    assert e.value.errors == ["task.pooling: 'avg' is not valid; valid values: auto, mean, cls, max"]
    # the accuracy budget scores every task in its own terms (Task.score / Task.divergence)
    assert validate(compose_cfg(["task=embedding", "tune=accuracy"])).tune.method == "accuracy"


# ---------------------------------------------------------------------------------------------
# End to end on tiny random weights (one run per task, trimmed: 2 QAT steps, no benchmark grid)

FAST = ["benchmark=none", "qat.max_steps=2", "export.tensorrt_graphs=false", "finetune.max_steps=2"]


def test_embedding_end_to_end_pools_inside_the_graph(tmp_path):
    ctx = run_tiny(tmp_path, ["task=embedding", "task.normalize=true", "qat.keep_best=true", *FAST[:3]])
    run = tmp_path / "run"
    g = onnx.load(str(run / "model_int8.onnx")).graph
    out = g.output[0]
    assert out.name == "sentence_embedding"
    assert out.type.tensor_type.shape.dim[0].dim_param == "batch" and len(out.type.tensor_type.shape.dim) == 2
    # The engines return the pooled, normalized embedding, and the FP32 engine matches torch.
    feed = ctx.tokenizer(["a fine film .", "dull"], return_tensors="np", padding=True)
    e32 = ctx.engines["fp32"].run({k: feed[k].astype(np.int64) for k in ctx.engines["fp32"].input_names})
    with torch.no_grad():
        ref = ctx.fp32_model(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits.numpy()
    assert e32.shape == (2, 64)  # (batch, tiny hidden size)
    assert np.allclose(np.linalg.norm(e32, axis=1), 1.0, atol=1e-5) and np.abs(e32 - ref).max() < 1e-4
    m = json.loads((run / "metrics.json").read_text())
    assert m["task"] == "embedding" and m["stages"]["finetune"]["status"] == "skipped"
    emb = m["embedding"]
    assert set(emb["int8"]) == {"cosine_mean", "cosine_p1", "recall_at_10", "knn_accuracy"} and emb["fp32"]["knn_accuracy"] is not None
    assert 0.9 < emb["int8"]["cosine_mean"] <= 1.0 + 1e-6 and emb["int8"]["cosine_p1"] <= emb["int8"]["cosine_mean"]
    assert m["accuracy"]["int8"] == emb["int8"]["knn_accuracy"]
    assert m["parity"]["cosine"] > 0.9 and m["parity"]["recall_at_10"] is not None
    # QAT distilled the FP32 embeddings (1 - cosine: small and finite, no labels involved) and chose its
    # best state by fidelity to FP32 on the tuning split, not by classification accuracy.
    assert 0.0 <= m["training"]["qat"]["final_loss"] < 0.1
    assert m["training"]["qat"]["selection"]["start"]["measure"] == "mean cosine to FP32"
    assert "embedding int8 vs FP32" in (run / "report.md").read_text()


# ---------------------------------------------------------------------------------------------
# token_classification: alignment, word predictions, seqeval, synthetic data


def test_first_sub_token_carries_the_word_label():
    # "[CLS] new york ##er rocks [SEP]": words 0 (new), 1 (yorker = york ##er), 2 (rocks)
    word_ids = [None, 0, 1, 1, 2, None]
    assert align_labels(word_ids, [3, 4, 0]) == [IGNORE, 3, 4, IGNORE, 0, IGNORE]
    # The word's prediction is read at its first sub-token only: the ##er position's argmax is ignored.
    logits = np.eye(5)[[0, 3, 4, 1, 0, 0]]
    assert word_predictions(logits, align_labels(word_ids, [3, 4, 0])) == [3, 4, 0]


def test_alignment_with_the_real_tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_embedded_model_path())
    words = ["akira", "tanaka", "unbelievably", "good"]
    enc = tok(words, is_split_into_words=True)
    labels = align_labels(enc.word_ids(), [3, 6, 0, 0])
    firsts = [t for t, lab in zip(tok.convert_ids_to_tokens(enc["input_ids"]), labels) if lab != IGNORE]
    assert [lab for lab in labels if lab != IGNORE] == [3, 6, 0, 0] and not any(t.startswith("##") for t in firsts)
    assert len(labels) > len(words) + 2  # some word was split into several sub-tokens, all but the first ignored


def test_entity_scores_follow_conll_span_matching():
    task = TokenClassification(validate(compose_cfg(["task=token_classification"])).task)
    task.tag_names = ["O", "B-PER", "I-PER", "B-LOC"]
    # one sentence, 5 words; gold: PER (words 0-1), LOC (word 3). Predicted: PER cut short (word 0 only), LOC right.
    gold = [1, 2, 0, 3, 0]
    pred = [1, 0, 0, 3, 0]
    data = Encoded([{"input_ids": list(range(7))}], [[IGNORE, *gold, IGNORE]])
    logits = np.eye(4)[[0, *pred, 0]]
    s = task.entity_scores([logits], data)
    # entities: gold {PER 0-1, LOC 3}, predicted {PER 0-0, LOC 3}: 1 of 2 right each way
    assert (s["precision"], s["recall"], s["f1"]) == (0.5, 0.5, 0.5) and s["token_accuracy"] == 4 / 5


def test_synthetic_ner_tags_exactly_the_inserted_entities():
    split = synthetic_ner(["a dull film .", "great fun"], seed=3)
    for words, tags in zip(split.texts, split.labels):
        assert len(words) == len(tags)
        spans, current = [], None
        for w, t in zip(words, tags):
            name = SYNTH_TAGS[t]
            if name.startswith("B-"):
                current = [name[2:], [w]]
                spans.append(current)
            elif name.startswith("I-"):
                assert current is not None and current[0] == name[2:]
                current[1].append(w)
            else:
                current = None
        assert spans and all(" ".join(ws) in SYNTH_ENTITIES[kind] for kind, ws in spans)


def test_token_classification_end_to_end_on_synthetic_data(tmp_path):
    # qat=kd_best: hidden-state distillation through the task's own loss, best state by the task's own measure.
    ctx = run_tiny(tmp_path, ["task=token_classification", *FAST, "qat=kd_best"])
    run = tmp_path / "run"
    out = onnx.load(str(run / "model_int8.onnx")).graph.output[0]
    assert out.name == "logits" and [d.dim_param for d in out.type.tensor_type.shape.dim[:2]] == ["batch", "sequence"]
    m = json.loads((run / "metrics.json").read_text())
    assert m["task"] == "token_classification" and ctx.splits.label_names == SYNTH_TAGS
    assert set(m["token_classification"]["int8"]) == {"precision", "recall", "f1", "token_accuracy"}
    assert m["accuracy"]["int8"] == m["token_classification"]["int8"]["f1"]
    assert m["parity"]["n"] > len(ctx.encoded["eval"]) and m["parity"]["argmax_agreement"] > 0.9
    assert "entities int8" in (run / "report.md").read_text()
    sel = m["training"]["qat"]["selection"]
    assert [e["step"] for e in m["training"]["qat"]["evals"]] == [0, 1, 2] and "kl" not in sel["best"]


# ---------------------------------------------------------------------------------------------
# question_answering: SQuAD metric, answer tokens, windows with a stride, decoding


def test_squad_exact_match_and_f1_of_a_known_prediction_set():
    preds = ["the Eiffel Tower", "in 1889", "Paris France"]
    refs = [["Eiffel Tower"], ["1889", "in 1889"], ["Paris"]]
    # EM: articles and case ignored -> 1; "in 1889" is a reference -> 1; "paris france" != "paris" -> 0.
    # F1: 1; 1; precision 1/2, recall 1 -> 2/3.
    s = squad_scores(preds, refs)
    assert s["exact_match"] == pytest.approx(2 / 3) and s["f1"] == pytest.approx((1 + 1 + 2 / 3) / 3)
    assert normalize_answer("The  Cat, sat!") == "cat sat"


def test_answer_tokens_inside_and_outside_a_window():
    # tokens: [CLS] q q [SEP] "great"(0-5) "fun"(6-9) "film"(10-14) [SEP]
    offs = [None, None, None, None, (0, 5), (6, 9), (10, 14), None]
    assert answer_tokens(offs, ("fun film", 6)) == (5, 6)
    assert answer_tokens(offs[:6] + [None], ("fun film", 6)) == (0, 0)  # the window ends inside the answer


def test_a_span_crossing_a_window_boundary_is_labelled_and_decoded_in_the_window_holding_it():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_embedded_model_path())
    words = [f"w{i}" for i in range(40)]
    context = " ".join(words)
    answer = "w12 w13 w14"  # window 2 (w5..w13) ends inside it; window 3 (w10..w18) holds it
    split = QASplit(["which words ?"], [context], [[(answer, context.index(answer))]])
    task = QuestionAnswering(validate(compose_cfg(["task=question_answering", "task.doc_stride=8"])).task)
    enc = task.encode(tok, split, max_length=24)
    assert len(enc.features) > 2 and set(enc.example) == {0}
    spans = [tuple(o for o in offs if o is not None) for offs in enc.offsets]
    start, end = context.index(answer), context.index(answer) + len(answer)
    cut = [i for i, s in enumerate(spans) if s[0][0] <= start < s[-1][1] < end]  # windows ending inside the answer
    whole = [i for i, s in enumerate(spans) if s[0][0] <= start and end <= s[-1][1]]
    assert cut and whole, "the example must have a window that cuts the answer and one that holds it"
    assert all(enc.labels[i] == (0, 0) for i in cut)
    for i in whole:
        s, e = enc.labels[i]
        assert context[enc.offsets[i][s][0] : enc.offsets[i][e][1]] == answer
    # Decoding over all windows: logits peaked at the holding window's labels give the answer back.
    windows = []
    for i in range(len(enc.features)):
        logits = np.zeros((len(enc.features[i]["input_ids"]), 2))
        if i == whole[0]:
            logits[enc.labels[i][0], 0] = logits[enc.labels[i][1], 1] = 10.0
        windows.append(logits)
    assert decode(windows, enc.offsets, context, n_best=5, max_answer_length=30) == answer
    assert decode(windows, enc.offsets, context, n_best=5, max_answer_length=2) != answer  # 3 tokens > max length


def test_synthetic_qa_asks_for_each_inserted_entity_once_at_its_exact_offset():
    split = synthetic_qa(["a dull film .", "great fun", "too long", "the end"], seed=5, questions=3)
    assert len(split.questions) == 3 and len(set(split.contexts)) == 1
    kinds = {q: k for k, q in SYNTH_QUESTIONS.items()}
    for q, context, [(answer, start)] in zip(split.questions, split.contexts, split.answers):
        assert context[start : start + len(answer)] == answer and answer in SYNTH_ENTITIES[kinds[q]]
        assert context.count(answer) == 1  # one right span per question
    assert sorted(split.questions) == sorted(SYNTH_QUESTIONS.values())


def test_question_answering_end_to_end_on_synthetic_data(tmp_path):
    ctx = run_tiny(tmp_path, ["task=question_answering", "model.max_length=64", "task.doc_stride=16", *FAST])
    run = tmp_path / "run"
    out = onnx.load(str(run / "model_int8.onnx")).graph.output[0]
    assert out.name == "span_logits" and [d.dim_param for d in out.type.tensor_type.shape.dim[:2]] == ["batch", "sequence"]
    assert out.type.tensor_type.shape.dim[2].dim_value == 2
    m = json.loads((run / "metrics.json").read_text())
    assert len(ctx.encoded["eval"]) > len(ctx.splits.eval)  # long synthetic contexts: several windows each
    assert set(m["question_answering"]["int8"]) == {"exact_match", "f1", "answer_agreement_vs_fp32"}
    assert m["accuracy"]["int8"] == m["question_answering"]["int8"]["f1"] and m["parity"]["argmax_agreement"] > 0.8
    assert "SQuAD int8" in (run / "report.md").read_text()


def test_sweep_summary_has_the_task_and_its_metrics(tmp_path):
    from pipeline.sweep_report import write_report

    job = tmp_path / "0"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra/overrides.yaml").write_text("- task=embedding\n")
    (job / "manifest.json").write_text(json.dumps({"status": "done", "stages": {}}))
    metrics = {
        "task": "embedding",
        "accuracy": {"fp32": 0.8, "int8": 0.79},
        "parity": {"argmax_agreement": None, "cosine": 0.99},
        "latency_ms": {},
        "embedding": {"int8": {"cosine_mean": 0.991, "cosine_p1": 0.95, "recall_at_10": 0.93, "knn_accuracy": 0.79}},
    }
    (job / "metrics.json").write_text(json.dumps(metrics))
    (row,) = write_report(tmp_path)
    assert row["task"] == "embedding"
    assert row["task_metrics"] == "cosine_mean=0.9910 cosine_p1=0.9500 recall_at_10=0.9300 knn_accuracy=0.7900"
    assert "- 0 (embedding): cosine_mean=0.9910" in (tmp_path / "sweep_report.md").read_text()


def _files(tmp_path, rows_train, rows_eval):
    for name, rows in (("train", rows_train), ("eval", rows_eval)):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return ["data=csv", f"data.train_path={tmp_path}/train.jsonl", f"data.eval_path={tmp_path}/eval.jsonl"]


def test_token_classification_reads_word_and_tag_lists_from_jsonl(tmp_path):
    rows = [{"tokens": ["maria", "lopez", "smiles"], "ner_tags": ["B-PER", "I-PER", "O"]}, {"tokens": ["rome"], "ner_tags": ["B-LOC"]}]
    cfg = validate(compose_cfg(["task=token_classification", *_files(tmp_path, rows, rows[:1])]))
    splits = TokenClassification(cfg.task).load_splits(cfg.data)
    assert splits.label_names == ["B-LOC", "B-PER", "I-PER", "O"] and splits.eval.labels == [[1, 2, 3]]
    bad = [{"tokens": ["a", "b"], "ner_tags": ["O"]}]
    cfg = validate(compose_cfg(["task=token_classification", *_files(tmp_path, rows + bad, rows)]))
    with pytest.raises(ConfigError) as e:
        TokenClassification(cfg.task).load_splits(cfg.data)
    assert e.value.errors == [
        f"data.train_path: {tmp_path}/train.jsonl line 3: task.tags_column 'ner_tags' must be a list with one tag per word (2), got ['O']"
    ]


def test_question_answering_reads_squad_rows_from_jsonl_and_checks_answer_offsets(tmp_path):
    ok = {"question": "who?", "context": "a film by maria lopez", "answers": {"text": ["maria lopez"], "answer_start": [10]}}
    cfg = validate(compose_cfg(["task=question_answering", *_files(tmp_path, [ok, ok], [ok])]))
    splits = QuestionAnswering(cfg.task).load_splits(cfg.data)
    assert splits.eval.answers == [[("maria lopez", 10)]]
    off = {**ok, "answers": {"text": ["maria lopez"], "answer_start": [9]}}
    cfg = validate(compose_cfg(["task=question_answering", *_files(tmp_path, [ok, off], [ok])]))
    with pytest.raises(ConfigError) as e:
        QuestionAnswering(cfg.task).load_splits(cfg.data)
    assert e.value.errors == [
        f"data.train_path: {tmp_path}/train.jsonl line 2: answer 'maria lopez' is not at its answer_start in the context"
    ]


def test_embedding_probe_runs_on_a_tiny_model(tmp_path):
    """scripts/embedding_probe.py: fake-quant variants against FP32 in one process (tiny random model); each variant
    starts from the calibrated state (the first one measured again last gives the same numbers)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("embedding_probe", Path(__file__).resolve().parents[1] / "scripts" / "embedding_probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    out = tmp_path / "probe.json"
    variants = ["percentile_99_99", "mse+ffn2_max+ln_max@w8", "percentile_99_99@acts_only@weights_only", "percentile_99_99"]
    tiny = [o for o in TINY if not o.startswith("engine=")]  # the probe runs no engine (engine=none)
    probe.main(["--variants", ",".join(variants), "--json", str(out), "--", *tiny, "task=embedding", f"cache.dir={tmp_path}/cache"])
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == variants
    metrics = [{k: v for k, v in r.items() if k not in ("variant", "seconds")} for r in rows]
    assert metrics[0] == metrics[-1]
    assert metrics[2]["cosine_p1"] > 0.99999  # every quantizer off: the FP32 embedding


@pytest.mark.parametrize("task", ["embedding", "token_classification"])
def test_tune_calibrator_scores_each_task_in_its_own_terms(tmp_path, task):
    """tune=calibrator on a task other than classification: the calibrators are ranked by the task's own
    divergence from FP32 (embedding 1 - cosine, token tasks per-token KL) and scored by its own score."""
    ctx = run_tiny(tmp_path, [f"task={task}", "tune=calibrator", "tune.calibrators=[max,percentile_99_99,mse]", "qat=none", *FAST])
    t = json.loads((ctx.run_dir / "metrics.json").read_text())["tune"]
    scores = t["calibrator_scores"]
    assert set(scores) == {"max", "percentile_99_99", "mse"}
    assert t["calibrator"] == min(scores, key=lambda c: (scores[c]["kl"], -scores[c]["accuracy"]))
    assert all(0.0 <= s["kl"] < float("inf") for s in scores.values()) and len({s["kl"] for s in scores.values()}) > 1
    assert t["fp32_tune_accuracy"] == pytest.approx(ctx.task.score(_fp32_tune_outputs(ctx), ctx.encoded["tune"]))
    assert t["drop_ci95"] is None  # no per-example correctness for these scores: no paired interval claimed


def _fp32_tune_outputs(ctx):
    from pipeline.inference import torch_logits

    return torch_logits(ctx.fp32_model, ctx.tokenizer, ctx.encoded["tune"], 64, ctx.device, token_level=ctx.task.token_level)
