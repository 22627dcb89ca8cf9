"""question_answering: extractive, SQuAD-style (v1.1: every question has an answer in its context).

Graph output `span_logits` (batch, sequence, 2): start and end logits stacked on the last axis (one
output keeps every engine's single-output interface). Long contexts are cut into overlapping windows
(`task.doc_stride` tokens shared between neighbours, the question repeated in each); a window that
does not contain the whole answer is trained to point at the first token ([CLS]), as in Hugging Face's
question-answering recipe. Decoding: for each example, over all its windows, the best span by
start + end logit among the `task.n_best` top starts and ends that lie in the context, with
end >= start and at most `task.max_answer_length` tokens; its text is cut from the context by the
tokenizer's character offsets. Exact match and F1: the official SQuAD v1.1 evaluation (ported below).

Data (same loader code for files and the hub): rows with `question`, `context` and `answers`
({"text": [...], "answer_start": [...]}, SQuAD's format). data=movie_snippets generates SYNTHETIC
questions from the embedded snippets (`synthetic_qa`).
"""

from __future__ import annotations

import random
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForQuestionAnswering
from transformers.utils import ModelOutput

from pipeline.data import DataError, DataSplits
from pipeline.data.batching import Encoded
from pipeline.data.sources import cut_splits, raw_rows
from pipeline.inference import kl_per_example
from pipeline.schema import DataConfig, ModelConfig, QuestionAnsweringConfig, TrainConfig
from pipeline.tasks.base import Models, token_level_selection
from pipeline.training import kd_loss

# ---------------------------------------------------------------------------------------------
# The official SQuAD v1.1 evaluation (rajpurkar/SQuAD-explorer evaluate-v1.1.py; the same code is
# Hugging Face evaluate's metrics/squad/compute_score.py), ported verbatim but returning fractions.


def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace."""

    def remove_articles(text: str) -> str:
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text: str) -> str:
        return " ".join(text.split())

    def remove_punc(text: str) -> str:
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def f1_score(prediction: str, ground_truth: str) -> float:
    prediction_tokens = normalize_answer(prediction).split()
    ground_truth_tokens = normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def exact_match_score(prediction: str, ground_truth: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(ground_truth)


def metric_max_over_ground_truths(metric_fn, prediction: str, ground_truths: list[str]) -> float:
    return max(metric_fn(prediction, gt) for gt in ground_truths)


def squad_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """{"exact_match", "f1"} as fractions (the official script prints them x 100)."""
    em = sum(metric_max_over_ground_truths(exact_match_score, p, r) for p, r in zip(predictions, references))
    f1 = sum(metric_max_over_ground_truths(f1_score, p, r) for p, r in zip(predictions, references))
    n = max(len(predictions), 1)
    return {"exact_match": em / n, "f1": f1 / n}


# ---------------------------------------------------------------------------------------------
# Data


@dataclass
class QASplit:
    questions: list[str]
    contexts: list[str]
    answers: list[list[tuple[str, int]]]  # per example: (text, start character) of each reference answer

    @property
    def texts(self) -> list[str]:
        return self.questions

    def __len__(self) -> int:
        return len(self.questions)

    def subset(self, idx: list[int]) -> QASplit:
        return QASplit([self.questions[i] for i in idx], [self.contexts[i] for i in idx], [self.answers[i] for i in idx])


@dataclass
class QAEncoded(Encoded):
    """Windows (features) of the examples; `labels` = (start, end) token of the answer per window."""

    example: list[int] = field(default_factory=list)  # per window: its example
    offsets: list[list[tuple[int, int] | None]] = field(default_factory=list)  # per token: context characters, None outside the context
    contexts: list[str] = field(default_factory=list)  # per example
    references: list[list[str]] = field(default_factory=list)  # per example: reference answer texts


# The synthetic questions, one per inserted entity type (the phrases of the synthetic NER data).
SYNTH_QUESTIONS = {"PER": "who stars in it ?", "ORG": "which studio made it ?", "LOC": "where is it set ?"}


def synthetic_qa(texts: list[str], seed: int, per_context: int = 4, questions: int = 1) -> QASplit:
    """SYNTHETIC questions on the embedded snippets: a context is `per_context` consecutive snippets
    joined by spaces (long enough to need several windows at short max_length), with one phrase of each
    entity type of the synthetic NER data inserted between words at seeded random positions:
    "with <person>", "from <studio>", "set in <place>" (token_classification.SYNTH_ENTITIES). Each of
    the context's `questions` questions (1-3, distinct types, seeded) asks for one of them —
    "who stars in it ?", "which studio made it ?", "where is it set ?" — and the answer is the entity's
    words, their character offset in the context exact. One answer per question by construction.

    (A first version asked `what follows "<w1> <w2>" ?` for the next one to three words, the length
    unsaid: 114-150 training steps left MiniLM-L6 at F1 ~ 0.14, near guessing; docs/how-to/tasks.md.)"""
    from pipeline.tasks.token_classification import _TEMPLATES, SYNTH_ENTITIES

    rng = random.Random(seed)
    q, c, a = [], [], []
    for start in range(0, len(texts) - per_context + 1, per_context):
        words = " ".join(t.strip() for t in texts[start : start + per_context]).split()
        if len(words) < 2:
            continue
        kinds = sorted(SYNTH_QUESTIONS)
        slots = sorted(rng.sample(range(len(words) + 1), len(kinds)))  # distinct gaps between words
        rng.shuffle(kinds)
        pieces, entity_at, prev = [], {}, 0
        for kind, pos in zip(kinds, slots):
            entity = rng.choice(SYNTH_ENTITIES[kind])
            pieces += words[prev:pos]
            lead = _TEMPLATES[kind].format("").strip()
            entity_at[kind] = (len(" ".join(pieces + [lead])) + 1 if pieces else len(lead) + 1, entity)
            pieces += [lead, entity]
            prev = pos
        context = " ".join(pieces + words[prev:])
        for kind in rng.sample(sorted(SYNTH_QUESTIONS), min(questions, len(SYNTH_QUESTIONS))):
            at, entity = entity_at[kind]
            q.append(SYNTH_QUESTIONS[kind])
            c.append(context)
            a.append([(entity, at)])
    return QASplit(q, c, a)


class SpanModel(torch.nn.Module):
    """A question-answering model whose `forward(**inputs).logits` is (batch, seq, 2): start and end
    logits stacked, the graph's one output `span_logits`."""

    graph_output = ("span_logits", {0: "batch", 1: "sequence"})

    def __init__(self, qa_model: torch.nn.Module):
        super().__init__()
        self.qa = qa_model

    @property
    def config(self):
        return self.qa.config

    def set_attn_implementation(self, impl: str) -> None:
        self.qa.set_attn_implementation(impl)

    def save_pretrained(self, folder, **kwargs) -> None:
        self.qa.save_pretrained(folder, **kwargs)  # finetuned/ loads back with AutoModelForQuestionAnswering

    def forward(self, **inputs) -> ModelOutput:
        out = self.qa(**inputs)
        return ModelOutput(logits=torch.stack([out.start_logits, out.end_logits], dim=-1))


def decode(
    windows: list[np.ndarray], offsets: list[list[tuple[int, int] | None]], context: str, n_best: int, max_answer_length: int
) -> str:
    """Best answer text of one example over its windows: span_logits (len, 2) and per-token context
    offsets (None outside the context) of each window."""
    best, best_score = "", -np.inf
    for logits, offs in zip(windows, offsets):
        start, end = logits[:, 0], logits[:, 1]
        for s in np.argsort(start)[::-1][:n_best]:
            for e in np.argsort(end)[::-1][:n_best]:
                if s >= len(offs) or e >= len(offs) or offs[s] is None or offs[e] is None:
                    continue
                if e < s or e - s + 1 > max_answer_length:
                    continue
                score = start[s] + end[e]
                if score > best_score:
                    best_score, best = score, context[offs[s][0] : offs[e][1]]
    return best


class QuestionAnswering:
    name = "question_answering"
    output_name = "span_logits"
    output_axes = {0: "batch", 1: "sequence"}
    token_level = True
    score_name = "F1"
    distills = False

    def __init__(self, cfg: QuestionAnsweringConfig):
        self.cfg = cfg

    # --- data ---
    def load_splits(self, cfg: DataConfig) -> DataSplits:
        if cfg.source == "movie_snippets":
            from pipeline.data import load_splits

            base = load_splits(cfg)
            # Training contexts carry several questions (more examples from the same text); the others one each.
            parts = [
                synthetic_qa(
                    getattr(base, s).texts, cfg.split_seed + i, questions=self.cfg.synthetic_train_questions if s == "train" else 1
                )
                for i, s in enumerate(("train", "calib", "eval"))
            ]
            tune = synthetic_qa(base.tune.texts, cfg.split_seed + 3) if base.tune is not None and len(base.tune) >= 4 else None
            return DataSplits(*parts, label_names=["span"], tune=tune)
        return self._tables(cfg)

    def _tables(self, cfg: DataConfig) -> DataSplits:
        problems: list[str] = []
        rows, where, _ = raw_rows(cfg, problems)
        if problems or len(rows) < 2:
            raise DataError(problems or ["no data"])
        out = {part: self._read_rows(r, where[part], problems) for part, r in rows.items()}
        if problems:
            raise DataError(problems)
        return cut_splits(cfg, out["train"], out["eval"], ["span"])

    def _read_rows(self, rows: list[dict], where, problems: list[str]) -> QASplit:
        c = self.cfg
        q, ctx, ans = [], [], []
        for i, row in enumerate(rows):
            question, context, answers = row.get(c.question_column), row.get(c.context_column), row.get(c.answers_column)
            if not isinstance(question, str) or not question.strip() or not isinstance(context, str) or not context.strip():
                problems.append(f"{where(i)}: {c.question_column!r} and {c.context_column!r} must be non-empty strings")
                continue
            texts = (answers or {}).get("text") if isinstance(answers, dict) else None
            starts = (answers or {}).get("answer_start") if isinstance(answers, dict) else None
            if not texts or not isinstance(texts, list) or not isinstance(starts, list) or len(texts) != len(starts):
                problems.append(
                    f"{where(i)}: {c.answers_column!r} must be {{'text': [...], 'answer_start': [...]}} of equal length, got {answers!r}"
                )
                continue
            bad = [t for t, s in zip(texts, starts) if not isinstance(s, int) or context[s : s + len(t)] != t]
            if bad:
                problems.append(f"{where(i)}: answer {bad[0]!r} is not at its answer_start in the context")
                continue
            q.append(question.strip())
            ctx.append(context)
            ans.append(list(zip(texts, starts)))
        return QASplit(q, ctx, ans)

    # --- model ---
    def load_model(self, cfg: ModelConfig, num_labels: int, device: torch.device):
        from pipeline.models import load_model

        loaded = load_model(cfg, 2, device, AutoModelForQuestionAnswering)
        loaded.model = SpanModel(loaded.model).to(device).eval()
        return loaded

    def encode(self, tokenizer, split: QASplit, max_length: int) -> QAEncoded:
        """Windows over each (question, context): the context truncated into overlapping pieces
        (`task.doc_stride` shared tokens); per window the answer's (start, end) tokens, or (0, 0) when
        the window does not hold the whole (first) answer."""
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("task=question_answering needs a fast tokenizer (character offsets of tokens)")
        enc = tokenizer(
            split.questions,
            split.contexts,
            truncation="only_second",
            max_length=max_length,
            stride=self.cfg.doc_stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
        )
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        out = QAEncoded([], [], contexts=list(split.contexts), references=[[t for t, _ in a] for a in split.answers])
        for f, ex in enumerate(enc["overflow_to_sample_mapping"]):
            seq = enc.sequence_ids(f)
            offs = [tuple(o) if s == 1 else None for o, s in zip(enc["offset_mapping"][f], seq)]
            out.features.append({k: enc[k][f] for k in keys})
            out.labels.append(answer_tokens(offs, split.answers[ex][0]))
            out.example.append(ex)
            out.offsets.append(offs)
        return out

    def cache_parts(self) -> tuple:
        c = self.cfg
        return (self.name, c.doc_stride, c.question_column, c.context_column, c.answers_column)

    def objective(self, net, inputs: dict, labels: torch.Tensor, teacher: torch.nn.Module | None, tcfg: TrainConfig) -> torch.Tensor:
        """Mean of the start and end cross-entropies (labels (batch, 2)); with qat.distill, kd_loss per end."""
        logits = net(**inputs).logits  # (batch, seq, 2)
        if tcfg.distill and teacher is not None:
            with torch.no_grad():
                t = teacher(**inputs).logits
            parts = [kd_loss(logits[..., k], t[..., k], labels[:, k], tcfg.kd_alpha, tcfg.kd_temperature) for k in (0, 1)]
        else:
            parts = [F.cross_entropy(logits[..., k], labels[:, k]) for k in (0, 1)]
        return (parts[0] + parts[1]) / 2

    # --- metrics ---
    def predictions(self, outputs: list[np.ndarray], data: QAEncoded) -> list[str]:
        if not isinstance(data, QAEncoded):
            raise ValueError("task=question_answering: evaluation needs the encoded windows (evaluate.max_examples is not supported)")
        by_example: dict[int, list[int]] = {}
        for f in range(len(outputs)):
            by_example.setdefault(data.example[f], []).append(f)
        return [
            decode([outputs[f] for f in fs], [data.offsets[f] for f in fs], data.contexts[ex], self.cfg.n_best, self.cfg.max_answer_length)
            for ex, fs in sorted(by_example.items())
        ]

    def squad(self, outputs: list[np.ndarray], data: QAEncoded) -> dict[str, float]:
        preds = self.predictions(outputs, data)
        examples = sorted({data.example[f] for f in range(len(outputs))})
        return squad_scores(preds, [data.references[ex] for ex in examples])

    def selection(self, models: Models, data: Encoded, batch_size: int, reference: dict) -> dict:
        return token_level_selection(self, models, data, batch_size, reference)

    def divergence(self, reference: list[np.ndarray], outputs: list[np.ndarray]) -> np.ndarray:
        """KL of the start distribution + KL of the end distribution over the example's positions."""
        return np.array([float(kl_per_example(r.T, o.T).sum()) for r, o in zip(reference, outputs)])

    def expected_loss(self, reference: list[np.ndarray], outputs: list[np.ndarray]) -> None:
        return None  # SQuAD F1 is not the probability of one answer per example

    def fidelity_targets(self, reference: list[np.ndarray], outputs: list[np.ndarray]) -> dict:
        return {}

    def correct(self, outputs: list[np.ndarray], data: Encoded) -> None:
        return None  # SQuAD F1 is a mean over questions, but outputs here are per window: no paired interval yet

    def config_errors(self, cfg) -> list[str]:
        return []

    def score(self, outputs: list[np.ndarray], data: QAEncoded) -> float | None:
        return self.squad(outputs, data)["f1"]

    def parity(self, quantized: list[np.ndarray], fake_quant: list[np.ndarray]) -> dict[str, Any]:
        """Per window: the same (argmax start, argmax end) pair (span agreement); cosine of the token logits."""
        same = [bool((q.argmax(0) == f.argmax(0)).all()) for q, f in zip(quantized, fake_quant)]
        cos = [float((x * y).sum() / (np.linalg.norm(x) * np.linalg.norm(y) + 1e-12)) for x, y in zip(quantized, fake_quant)]
        return {"argmax_agreement": float(np.mean(same)), "cosine": float(np.mean(cos)), "n": len(same)}

    def task_metrics(self, outputs: dict[str, list[np.ndarray]], data: QAEncoded) -> dict[str, Any]:
        out = {label: self.squad(o, data) for label, o in outputs.items()}
        ref = self.predictions(outputs["fp32"], data) if "fp32" in outputs else None
        for label, o in outputs.items():
            if ref is not None and label != "fp32":  # decoded answers identical to FP32 torch's
                out[label]["answer_agreement_vs_fp32"] = float(np.mean([a == b for a, b in zip(self.predictions(o, data), ref)]))
        return out

    def report_rows(self, d: dict) -> list[tuple[str, str]]:
        rows = []
        for label, v in (d.get(self.name) or {}).items():
            agree = f", same answer as FP32 {100 * v['answer_agreement_vs_fp32']:.2f} %" if "answer_agreement_vs_fp32" in v else ""
            rows.append((f"SQuAD {label}", f"EM {100 * v['exact_match']:.2f} %, F1 {100 * v['f1']:.2f} %{agree}"))
        return rows

    def parity_text(self, p: dict) -> str:
        if not p or p.get("argmax_agreement") is None:
            return "—"
        return f"span (argmax start, end) agreement {100 * p['argmax_agreement']:.2f} %, cosine {p['cosine']:.5f}"


def answer_tokens(offsets: list[tuple[int, int] | None], answer: tuple[str, int]) -> tuple[int, int]:
    """(start, end) token of the answer inside a window, or (0, 0) ([CLS]) when the window does not
    contain all of it. offsets: per token its context characters, None for question / special tokens."""
    text, start_char = answer
    end_char = start_char + len(text)
    ctx = [i for i, o in enumerate(offsets) if o is not None]
    if not ctx or offsets[ctx[0]][0] > start_char or offsets[ctx[-1]][1] < end_char:
        return (0, 0)
    s = next(i for i in ctx if offsets[i][1] > start_char)
    e = next(i for i in reversed(ctx) if offsets[i][0] < end_char)
    return (s, e)
