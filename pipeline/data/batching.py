"""Tokenization once per split, then dynamically padded batches."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from pipeline.data.splits import Split


@dataclass
class Encoded:
    features: list[dict[str, list[int]]]  # per example: input_ids, attention_mask[, token_type_ids]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]  # (batch, seq) int64 each
    labels: torch.Tensor  # (batch,); (batch, seq) for per-token labels
    index: list[int]  # positions in the split (batches may be length-sorted)

    def to(self, device: torch.device) -> Batch:
        return Batch({k: v.to(device) for k, v in self.inputs.items()}, self.labels.to(device), self.index)


def encode(tokenizer, split: Split, max_length: int) -> Encoded:
    enc = tokenizer(split.texts, split.pairs, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    return Encoded([{k: enc[k][i] for k in keys} for i in range(len(split))], list(split.labels))


def batches(
    tokenizer,
    data: Encoded,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    sort_by_length: bool = False,
    group_by_length: bool = False,
    limit: int | None = None,
) -> Iterator[Batch]:
    """Batches padded to their longest example.

    shuffle: a seeded permutation (training). sort_by_length: group similar lengths (evaluation:
    less padding, same results). group_by_length (with shuffle): Hugging Face Trainer's length-grouped
    sampling; limit: stop after this many batches.
    """
    order = list(range(len(data)))
    if shuffle:
        rng = random.Random(seed)
        rng.shuffle(order)
    elif sort_by_length:
        order.sort(key=lambda i: len(data.features[i]["input_ids"]))
    if shuffle and group_by_length:
        chunks = _length_grouped(order, batch_size, lambda i: len(data.features[i]["input_ids"]), rng)
    else:
        chunks = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    for n, idx in enumerate(chunks):
        if limit is not None and n >= limit:
            return
        padded = tokenizer.pad([data.features[i] for i in idx], return_tensors="pt")
        inputs = {k: v.to(torch.long) for k, v in padded.items()}
        yield Batch(inputs, _labels([data.labels[i] for i in idx], inputs["input_ids"].shape[1]), idx)


# Batches per megabatch of length-grouped sampling (Hugging Face's LengthGroupedSampler uses 50).
MEGABATCH = 50


def _length_grouped(order: list[int], batch_size: int, length, rng: random.Random) -> list[list[int]]:
    """The shuffled order cut into megabatches of MEGABATCH batches, each sorted by length and cut into batches,
    then the batches in a seeded random order: every batch still a random draw of similar-length examples.
    Less padding: on the movie snippets (mean 26.8 tokens, max 72) 1.87x fewer padded tokens per epoch."""
    mega = batch_size * MEGABATCH
    grouped = [i for m in range(0, len(order), mega) for i in sorted(order[m : m + mega], key=length)]
    chunks = [grouped[start : start + batch_size] for start in range(0, len(grouped), batch_size)]
    rng.shuffle(chunks)
    return chunks


# Label of a padding position in per-token labels: ignored by the loss (cross-entropy's ignore_index).
IGNORE = -100


def _labels(labels: list, seq: int) -> torch.Tensor:
    """(batch,) for one label per example; per-token labels (lists, token classification) padded to the
    batch's sequence length with IGNORE -> (batch, seq)."""
    if labels and isinstance(labels[0], list):
        return torch.tensor([row + [IGNORE] * (seq - len(row)) for row in labels])
    return torch.tensor(labels)
