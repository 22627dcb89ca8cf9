"""Text -> engine inputs, exactly as the pipeline tokenizes (pipeline/data/batching.py, the tasks' encode).

The pipeline measures with the Hugging Face fast tokenizer: `tokenizer(texts, pairs, truncation=True,
max_length=model.max_length)` (longest-first truncation, special tokens added), then each batch padded to
its longest example (`tokenizer.pad`: pad id, token type id 0, mask 0, on the tokenizer's padding side).
This module does the same with the `tokenizers` library alone (the fast tokenizer's own Rust core, read
from its tokenizer.json) and numpy, so that it runs where torch and transformers are not installed: in
the serving environment and inside Triton's Python backend. It is the one tokenization code path of the
predictor (pipeline/deploy/predictor.py) and of the Triton `tokenizer` model, which gets a copy of this
file (the repository is self-contained). tests/test_predict.py checks it token for token against the
pipeline's own encoding.

Standalone on purpose: imports only the standard library, numpy and tokenizers.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SETTINGS_FILE = "textproc.json"
TOKENIZER_FILE = "tokenizer.json"
# Index of a token that belongs to no word (special tokens, padding) in word_ids arrays.
NO_WORD = -1


@dataclass
class Example:
    """One input after tokenization. Sentence tasks: one window; question answering: one or more
    overlapping windows of the context. Token classification: the words (whitespace-split, as its data
    is) with their character spans, and per token the word it belongs to."""

    windows: list[dict[str, list[int]]]  # per window: input_ids, attention_mask[, token_type_ids]
    text: str = ""
    context: str = ""  # question answering
    offsets: list[list[tuple[int, int] | None]] | None = None  # QA: per window, per token its context characters (None outside)
    word_ids: list[list[int]] | None = None  # token classification: per window, per token its word (NO_WORD outside words)
    word_spans: list[tuple[int, int]] | None = None  # token classification: character span of each word
    truncated: bool = False  # the text was longer than max_length tokens and was cut (as the pipeline cuts it)


def split_words(text: str) -> tuple[list[str], list[tuple[int, int]]]:
    """Whitespace-separated words and their character spans (token classification data is word lists;
    `str.split()` is how the synthetic data and CoNLL-style files are made)."""
    spans = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
    return [text[a:b] for a, b in spans], spans


class TextProcessor:
    """tokenizer.json + the run's settings -> padded int64 arrays by graph input name.

    settings (textproc.json): max_length, input_names (the ONNX graph's inputs, in order), pad_token_id,
    pad_token_type_id, padding_side, truncation_side; question answering: doc_stride.
    """

    def __init__(self, tokenizer_json: str, settings: dict):
        from tokenizers import Tokenizer

        self.settings = dict(settings)
        self.max_length = int(settings["max_length"])
        self.input_names = list(settings["input_names"])
        self.pad_values = {
            "input_ids": int(settings["pad_token_id"]),
            "attention_mask": 0,
            "token_type_ids": int(settings.get("pad_token_type_id", 0)),
        }
        self.padding_side = settings.get("padding_side", "right")
        self._tok = Tokenizer.from_str(tokenizer_json)
        self._tok.no_padding()  # padding is per batch, below (as tokenizer.pad does it)
        self._tok.no_truncation()
        self._truncation = {"direction": settings.get("truncation_side", "right")}

    @classmethod
    def from_hf(cls, tokenizer, max_length: int, input_names: list[str], **extra) -> TextProcessor:
        """From the Hugging Face fast tokenizer the pipeline used (its Rust core and padding settings)."""
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer: serving needs its tokenizer.json")
        settings = {
            "max_length": int(max_length),
            "input_names": list(input_names),
            "pad_token_id": int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0),
            "pad_token_type_id": int(getattr(tokenizer, "pad_token_type_id", 0) or 0),
            "padding_side": tokenizer.padding_side,
            "truncation_side": tokenizer.truncation_side,
            **extra,
        }
        return cls(tokenizer.backend_tokenizer.to_str(), settings)

    @classmethod
    def from_folder(cls, folder: str | Path) -> TextProcessor:
        folder = Path(folder)
        return cls((folder / TOKENIZER_FILE).read_text(encoding="utf-8"), json.loads((folder / SETTINGS_FILE).read_text()))

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / TOKENIZER_FILE).write_text(self._tok.to_str(), encoding="utf-8")
        (folder / SETTINGS_FILE).write_text(json.dumps(self.settings, indent=2) + "\n")

    # --- encoding ---------------------------------------------------------------------------------
    def _features(self, enc) -> dict[str, list[int]]:
        out = {"input_ids": list(enc.ids), "attention_mask": list(enc.attention_mask), "token_type_ids": list(enc.type_ids)}
        return {k: out[k] for k in self.input_names}

    def _truncate(self, strategy: str, stride: int = 0) -> None:
        self._tok.enable_truncation(self.max_length, stride=stride, strategy=strategy, **self._truncation)

    def encode(self, texts: list[str], pairs: list[str] | None = None) -> list[Example]:
        """Sentence (or sentence-pair) inputs: `tokenizer(texts, pairs, truncation=True, max_length=...)`."""
        self._truncate("longest_first")
        batch = list(texts) if pairs is None else list(zip(texts, pairs))
        encs = self._tok.encode_batch(batch, add_special_tokens=True)
        return [Example([self._features(e)], text=t, truncated=bool(e.overflowing)) for t, e in zip(texts, encs)]

    def encode_words(self, texts: list[str]) -> list[Example]:
        """Token classification: the whitespace-split words of each text, encoded as pre-split words
        (`is_split_into_words=True`), with each token's word and each word's character span."""
        self._truncate("longest_first")
        split = [split_words(t) for t in texts]
        encs = self._tok.encode_batch([w for w, _ in split], is_pretokenized=True, add_special_tokens=True)
        out = []
        for t, (_, spans), e in zip(texts, split, encs):
            wids = [NO_WORD if w is None else int(w) for w in e.word_ids]
            out.append(Example([self._features(e)], text=t, word_ids=[wids], word_spans=spans, truncated=bool(e.overflowing)))
        return out

    def encode_qa(self, questions: list[str], contexts: list[str], doc_stride: int) -> list[Example]:
        """Question answering: (question, context) cut into overlapping windows of the context, as
        `tokenizer(q, c, truncation="only_second", stride=doc_stride, return_overflowing_tokens=True)`."""
        self._truncate("only_second", doc_stride)
        encs = self._tok.encode_batch(list(zip(questions, contexts)), add_special_tokens=True)
        out = []
        for q, c, e in zip(questions, contexts, encs):
            windows, offsets = [], []
            for w in [e, *e.overflowing]:
                windows.append(self._features(w))
                offsets.append([tuple(o) if s == 1 else None for o, s in zip(w.offsets, w.sequence_ids)])
            out.append(Example(windows, text=q, context=c, offsets=offsets, truncated=False))
        return out

    # --- batching ---------------------------------------------------------------------------------
    def pad(self, features: list[dict[str, list[int]]], extra: dict[str, list[list[int]]] | None = None) -> dict[str, np.ndarray]:
        """Features padded to the longest one: (batch, seq) int64 by input name (as `tokenizer.pad`).
        `extra`: more per-token int lists padded the same way with NO_WORD (e.g. word_ids)."""
        seq = max(len(f["input_ids"]) for f in features)
        out = {}
        for name in self.input_names:
            out[name] = _pad_rows([f[name] for f in features], seq, self.pad_values[name], self.padding_side)
        for name, rows in (extra or {}).items():
            out[name] = _pad_rows(rows, seq, NO_WORD, self.padding_side)
        return out


def _pad_rows(rows: list[list[int]], seq: int, value: int, side: str) -> np.ndarray:
    arr = np.full((len(rows), seq), value, dtype=np.int64)
    for i, r in enumerate(rows):
        if side == "left":
            arr[i, seq - len(r) :] = r
        else:
            arr[i, : len(r)] = r
    return arr
