"""token_classification: one BIO tag per word (NER-style), scored per entity with seqeval.

Graph output `logits` (batch, sequence, num_tags). Words are tokenized with the fast tokenizer's word
alignment; the first sub-token of each word carries the word's tag and the others (and special tokens)
are ignored (label -100), the standard alignment (Hugging Face's token-classification recipe). A word's
prediction is the argmax at its first sub-token. Metrics: entity-level precision / recall / F1 (seqeval,
CoNLL-2000 evaluation: an entity counts only when type and both boundaries match) and token accuracy
over labelled words; parity: argmax agreement per labelled token and the mean cosine of token logits.

Data (same loader code for files and the hub): rows with a list of words (`task.tokens_column`) and a
list of tags (`task.tags_column`, strings, or ids with names from the hub's ClassLabel / `data.labels`).
data=movie_snippets generates SYNTHETIC data from the embedded snippets (`synthetic_ner`): no real
labelled NER data installs offline here.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForTokenClassification

from pipeline.data import DataError, DataSplits
from pipeline.data.batching import IGNORE, Encoded
from pipeline.data.sources import cut_splits, raw_rows
from pipeline.schema import DataConfig, ModelConfig, TokenClassificationConfig, TrainConfig
from pipeline.tasks.base import Models, token_divergence, token_level_selection
from pipeline.training import kd_loss


@dataclass
class TaggedSplit:
    """Words and tag ids per sentence (the token-level counterpart of data.Split)."""

    texts: list[list[str]]  # words
    labels: list[list[int]]  # one tag id per word

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: list[int]) -> TaggedSplit:
        return TaggedSplit([self.texts[i] for i in idx], [self.labels[i] for i in idx])


def align_labels(word_ids: list[int | None], word_tags: list[int]) -> list[int]:
    """Per sub-token labels: the word's tag on its first sub-token, IGNORE on the others and on
    special tokens (word id None)."""
    out, previous = [], None
    for w in word_ids:
        out.append(IGNORE if w is None or w == previous else word_tags[w])
        previous = w
    return out


def word_predictions(token_logits: np.ndarray, token_labels: list[int]) -> list[int]:
    """Tag ids per labelled word: the argmax at each first sub-token (where the label is not IGNORE)."""
    keep = np.asarray(token_labels[: len(token_logits)]) != IGNORE
    return token_logits[keep].argmax(-1).tolist()


# --- synthetic data (offline) -------------------------------------------------------------------
# Entities inserted into the embedded movie-review snippets: invented person names, studios and places
# (two-word spans get B- then I- tags), so the tags are known exactly. Synthetic: it exercises the task
# end to end (alignment, spans, quantized-engine agreement) and is no measure of real NER quality.
SYNTH_ENTITIES = {
    "PER": [
        "maria lopez",
        "john carter",
        "akira tanaka",
        "olga petrova",
        "samuel okafor",
        "lena fischer",
        "raj patel",
        "chloe martin",
        "david cohen",
        "ingrid berg",
        "tomas novak",
        "fatima haddad",
    ],
    "ORG": [
        "paramount",
        "lionsgate studios",
        "miramax",
        "silver screen pictures",
        "pixel house",
        "northwind films",
        "a24",
        "blue harbor media",
        "castle rock",
        "orion pictures",
    ],
    "LOC": [
        "paris",
        "new york",
        "tokyo",
        "buenos aires",
        "cairo",
        "oslo",
        "mumbai",
        "los angeles",
        "rome",
        "sydney",
    ],
}
SYNTH_TAGS = ["O", "B-LOC", "B-ORG", "B-PER", "I-LOC", "I-ORG", "I-PER"]
_TEMPLATES = {"PER": "with {}", "ORG": "from {}", "LOC": "set in {}"}


def synthetic_ner(texts: list[str], seed: int) -> TaggedSplit:
    """Each snippet's words (whitespace-split), with one or two entity phrases inserted at seeded random
    word positions (never inside an inserted entity): "with <person>", "from <studio>", "set in <place>";
    the entity words tagged B-/I-<type>, every other word O."""
    rng = random.Random(seed)
    ids = {t: i for i, t in enumerate(SYNTH_TAGS)}
    words_out, tags_out = [], []
    for text in texts:
        words = text.split()
        tags = [ids["O"]] * len(words)
        for _ in range(rng.choice((1, 2))):
            kind = rng.choice(sorted(SYNTH_ENTITIES))
            entity = rng.choice(SYNTH_ENTITIES[kind]).split()
            lead = _TEMPLATES[kind].split()[:-1]
            # never inside an entity already inserted (its I- words), so spans stay whole
            pos = rng.choice([p for p in range(len(words) + 1) if p == len(words) or not SYNTH_TAGS[tags[p]].startswith("I-")])
            words[pos:pos] = lead + entity
            tags[pos:pos] = [ids["O"]] * len(lead) + [ids[f"B-{kind}"]] + [ids[f"I-{kind}"]] * (len(entity) - 1)
        words_out.append(words)
        tags_out.append(tags)
    return TaggedSplit(words_out, tags_out)


class TokenClassification:
    name = "token_classification"
    output_name = "logits"
    output_axes = {0: "batch", 1: "sequence"}
    token_level = True
    score_name = "entity F1"
    distills = False

    def __init__(self, cfg: TokenClassificationConfig):
        self.cfg = cfg
        self.tag_names: list[str] = []

    # --- data ---
    def load_splits(self, cfg: DataConfig) -> DataSplits:
        if cfg.source == "movie_snippets":
            splits = self._synthetic(cfg)
        else:
            splits = self._tables(cfg)
        self.tag_names = splits.label_names
        return splits

    def _synthetic(self, cfg: DataConfig) -> DataSplits:
        from pipeline.data import load_splits

        base = load_splits(cfg)  # the snippets' own seeded cut (train / calib / eval); their sentiment is dropped
        parts = [synthetic_ner(getattr(base, s).texts, cfg.split_seed + i) for i, s in enumerate(("train", "calib", "eval"))]
        tune = synthetic_ner(base.tune.texts, cfg.split_seed + 3) if base.tune is not None and len(base.tune) else None
        return DataSplits(*parts, label_names=list(SYNTH_TAGS), tune=tune)

    def _tables(self, cfg: DataConfig) -> DataSplits:
        """CSV / JSON(L) files or a hub dataset: rows with a word list and a tag list."""
        problems: list[str] = []
        names = list(cfg.labels) if cfg.labels else None
        rows, where, ds = raw_rows(cfg, problems)
        if ds is not None and cfg.train_split in ds:  # the hub's ClassLabel names for the tags, in id order
            inner = getattr(ds[cfg.train_split].features.get(self.cfg.tags_column), "feature", None)
            names = names or (list(inner.names) if inner is not None and hasattr(inner, "names") else None)
        if problems or len(rows) < 2:
            raise DataError(problems or ["no data"])
        raw = {part: self._read_rows(r, where[part], problems) for part, r in rows.items()}
        if problems:
            raise DataError(problems)
        names = names or sorted({t for words, tags in raw["train"] for t in tags if isinstance(t, str)})
        ids = {str(n): i for i, n in enumerate(names)}
        out = {}
        for part, examples in raw.items():
            words_l, tags_l = [], []
            for i, (words, tags) in enumerate(examples):
                try:
                    tags_l.append([t if isinstance(t, int) and 0 <= t < len(names) else ids[str(t)] for t in tags])
                    words_l.append(words)
                except KeyError as exc:
                    problems.append(f"{where[part](i)}: tag {exc.args[0]!r} is not a known tag; known: {', '.join(map(str, names))}")
            out[part] = TaggedSplit(words_l, tags_l)
        if problems:
            raise DataError(problems)
        return cut_splits(cfg, out["train"], out["eval"], [str(n) for n in names])

    def _read_rows(self, rows: list[dict], where, problems: list[str]) -> list[tuple[list[str], list]]:
        out = []
        tc, gc = self.cfg.tokens_column, self.cfg.tags_column
        for i, row in enumerate(rows):
            words, tags = row.get(tc), row.get(gc)
            if not isinstance(words, list) or not words or not all(isinstance(w, str) for w in words):
                problems.append(f"{where(i)}: task.tokens_column {tc!r} must be a non-empty list of words, got {words!r}")
            elif not isinstance(tags, list) or len(tags) != len(words):
                problems.append(f"{where(i)}: task.tags_column {gc!r} must be a list with one tag per word ({len(words)}), got {tags!r}")
            else:
                out.append((words, tags))
        return out

    # --- model ---
    def load_model(self, cfg: ModelConfig, num_labels: int, device: torch.device):
        from pipeline.models import load_model

        loaded = load_model(cfg, num_labels, device, AutoModelForTokenClassification)
        loaded.model.graph_output = (self.output_name, dict(self.output_axes))  # per-token logits: dynamic sequence axis
        return loaded

    def encode(self, tokenizer, split: TaggedSplit, max_length: int) -> Encoded:
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("task=token_classification needs a fast tokenizer (word alignment of sub-tokens)")
        enc = tokenizer(split.texts, is_split_into_words=True, truncation=True, max_length=max_length)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        feats = [{k: enc[k][i] for k in keys} for i in range(len(split))]
        labels = [align_labels(enc.word_ids(i), split.labels[i]) for i in range(len(split))]
        return Encoded(feats, labels)

    def cache_parts(self) -> tuple:
        return (self.name, self.cfg.tokens_column, self.cfg.tags_column)

    def objective(self, net, inputs: dict, labels: torch.Tensor, teacher: torch.nn.Module | None, tcfg: TrainConfig) -> torch.Tensor:
        """Cross-entropy over labelled tokens; with qat.distill, kd_loss against the teacher on those tokens."""
        logits = net(**inputs).logits  # (batch, seq, tags)
        keep = labels != IGNORE
        if tcfg.distill and teacher is not None:
            with torch.no_grad():
                t_logits = teacher(**inputs).logits
            return kd_loss(logits[keep], t_logits[keep], labels[keep], tcfg.kd_alpha, tcfg.kd_temperature)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)

    # --- metrics ---
    def _tags(self, outputs: list[np.ndarray], data: Encoded) -> tuple[list[list[str]], list[list[str]]]:
        names = self.tag_names
        true, pred = [], []
        for logits, labels in zip(outputs, data.labels):
            keep = [lab for lab in labels[: len(logits)] if lab != IGNORE]
            true.append([names[t] for t in keep])
            pred.append([names[p] for p in word_predictions(logits, labels)])
        return true, pred

    def entity_scores(self, outputs: list[np.ndarray], data: Encoded) -> dict[str, float]:
        from seqeval.metrics import f1_score, precision_score, recall_score

        true, pred = self._tags(outputs, data)
        flat_t, flat_p = sum(true, []), sum(pred, [])
        return {
            "precision": float(precision_score(true, pred, zero_division=0)),
            "recall": float(recall_score(true, pred, zero_division=0)),
            "f1": float(f1_score(true, pred, zero_division=0)),
            "token_accuracy": float(np.mean([a == b for a, b in zip(flat_t, flat_p)])) if flat_t else 0.0,
        }

    def selection(self, models: Models, data: Encoded, batch_size: int, reference: dict) -> dict:
        return token_level_selection(self, models, data, batch_size, reference)

    def divergence(self, reference: list[np.ndarray], outputs: list[np.ndarray]) -> np.ndarray:
        return token_divergence(reference, outputs)

    def expected_loss(self, reference: list[np.ndarray], outputs: list[np.ndarray]) -> None:
        return None  # entity F1 is not the probability of one answer per example

    def fidelity_targets(self, reference: list[np.ndarray], outputs: list[np.ndarray]) -> dict:
        return {}

    def correct(self, outputs: list[np.ndarray], data: Encoded) -> None:
        return None  # entity F1 / span F1 are not per-example means

    def config_errors(self, cfg) -> list[str]:
        return []

    def score(self, outputs: list[np.ndarray], data: Encoded) -> float | None:
        return self.entity_scores(outputs, data)["f1"]

    def parity(self, quantized: list[np.ndarray], fake_quant: list[np.ndarray]) -> dict[str, Any]:
        a, b = np.concatenate(quantized), np.concatenate(fake_quant)  # every real token of every example
        cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)
        return {"argmax_agreement": float((a.argmax(-1) == b.argmax(-1)).mean()), "cosine": float(cos.mean()), "n": int(len(a))}

    def task_metrics(self, outputs: dict[str, list[np.ndarray]], data: Encoded) -> dict[str, Any]:
        return {label: self.entity_scores(out, data) for label, out in outputs.items()}

    def report_rows(self, d: dict) -> list[tuple[str, str]]:
        rows = []
        for label, v in (d.get(self.name) or {}).items():
            rows.append(
                (
                    f"entities {label}",
                    f"P {100 * v['precision']:.2f} %, R {100 * v['recall']:.2f} %, F1 {100 * v['f1']:.2f} %, "
                    f"token accuracy {100 * v['token_accuracy']:.2f} %",
                )
            )
        return rows

    def parity_text(self, p: dict) -> str:
        if not p or p.get("argmax_agreement") is None:
            return "—"
        return f"per-token argmax {100 * p['argmax_agreement']:.2f} %, cosine {p['cosine']:.5f}"
