"""Engine output -> what a user of each task wants, one example at a time (keyed by task name).

    sequence_classification  {"label", "label_id", "scores"}           scores = softmax of the logits
    embedding                {"embedding"}                              L2-normalized sentence embedding
    token_classification     {"entities": [{"entity", "start", "end", "text", "score"}]}   character spans
    question_answering       {"answer", "start", "end", "score"}      score = start + end logit of the span

Each function: (output, example, meta) -> dict, where `output` is the engine's output for one example (a
row for sentence tasks; the example's tokens for token classification; the list of its windows for
question answering), `example` the pipeline.deploy.textproc.Example it came from and `meta` the run's
facts (label_names, n_best, max_answer_length). The decisions are the evaluate stage's (argmax; the
task's own span decoding), so the predictor's labels are the ones the run measured.

Standalone on purpose (numpy only): the Triton `postprocess` model runs a copy of this file.
# TODO(Task protocol): these become a `postprocess(output, example, meta)` method of each Task class.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def sequence_classification(output: np.ndarray, example: Any, meta: dict) -> dict:
    names = meta.get("label_names") or []
    i = int(np.argmax(output))
    return {"label": str(names[i]) if i < len(names) else str(i), "label_id": i, "scores": _softmax(output.astype(np.float64)).tolist()}


def embedding(output: np.ndarray, example: Any, meta: dict) -> dict:
    v = output.astype(np.float32)
    return {"embedding": (v / max(float(np.linalg.norm(v)), 1e-12)).tolist()}


def token_classification(output: np.ndarray, example: Any, meta: dict) -> dict:
    """BIO tags per word (the argmax at each word's first token, as the task scores them), merged into
    entities: B-X starts one, I-X continues one of the same type (a stray I-X starts one, as seqeval
    reads it). Score: the mean softmax probability of the entity's words' tags."""
    names = meta["label_names"]
    word_ids = example.word_ids[0]
    probs = _softmax(output.astype(np.float64))
    tags: list[tuple[int, str, float]] = []  # (word, tag, probability) for each word seen (truncated words are not)
    previous = None
    for t, w in enumerate(word_ids[: len(output)]):
        if w >= 0 and w != previous:
            k = int(np.argmax(output[t]))
            tags.append((w, str(names[k]), float(probs[t, k])))
        previous = w
    entities: list[dict] = []
    current: dict | None = None
    for w, tag, p in tags:
        kind = tag[2:] if tag[:2] in ("B-", "I-") else None
        if kind is not None and tag.startswith("I-") and current is not None and current["entity"] == kind and current["_last"] == w - 1:
            current["end"], current["_last"] = example.word_spans[w][1], w
            current["_p"].append(p)
            continue
        current = None
        if kind is not None:
            current = {"entity": kind, "start": example.word_spans[w][0], "end": example.word_spans[w][1], "_last": w, "_p": [p]}
            entities.append(current)
    return {
        "entities": [
            {
                "entity": e["entity"],
                "start": e["start"],
                "end": e["end"],
                "text": example.text[e["start"] : e["end"]],
                "score": float(np.mean(e["_p"])),
            }
            for e in entities
        ]
    }


def question_answering(output: list[np.ndarray], example: Any, meta: dict) -> dict:
    """The best span over the example's windows, exactly as the task decodes it for SQuAD scoring
    (pipeline/tasks/question_answering.py `decode`): n_best starts x n_best ends inside the context,
    end >= start, at most max_answer_length tokens, highest start + end logit."""
    n_best, max_len = int(meta["n_best"]), int(meta["max_answer_length"])
    best, best_score = None, -np.inf
    for logits, offs in zip(output, example.offsets):
        start, end = logits[:, 0], logits[:, 1]
        for s in np.argsort(start)[::-1][:n_best]:
            for e in np.argsort(end)[::-1][:n_best]:
                if s >= len(offs) or e >= len(offs) or offs[s] is None or offs[e] is None:
                    continue
                if e < s or e - s + 1 > max_len:
                    continue
                score = start[s] + end[e]
                if score > best_score:
                    best_score, best = score, (offs[s][0], offs[e][1])
    if best is None:
        return {"answer": "", "start": None, "end": None, "score": None}
    return {"answer": example.context[best[0] : best[1]], "start": int(best[0]), "end": int(best[1]), "score": float(best_score)}


POSTPROCESS = {
    "sequence_classification": sequence_classification,
    "embedding": embedding,
    "token_classification": token_classification,
    "question_answering": question_answering,
}
