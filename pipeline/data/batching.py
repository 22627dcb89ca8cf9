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
    limit: int | None = None,
) -> Iterator[Batch]:
    """Batches padded to their longest example.

    shuffle: a seeded permutation (training). sort_by_length: group similar lengths (evaluation:
    less padding, same results). limit: stop after this many batches.
    """
    order = list(range(len(data)))
    if shuffle:
        random.Random(seed).shuffle(order)
    elif sort_by_length:
        order.sort(key=lambda i: len(data.features[i]["input_ids"]))
    for n, start in enumerate(range(0, len(order), batch_size)):
        if limit is not None and n >= limit:
            return
        idx = order[start : start + batch_size]
        padded = tokenizer.pad([data.features[i] for i in idx], return_tensors="pt")
        inputs = {k: v.to(torch.long) for k, v in padded.items()}
        yield Batch(inputs, _labels([data.labels[i] for i in idx], inputs["input_ids"].shape[1]), idx)


# Label of a padding position in per-token labels: ignored by the loss (cross-entropy's ignore_index).
IGNORE = -100


def _labels(labels: list, seq: int) -> torch.Tensor:
    """(batch,) for one label per example; per-token labels (lists, token classification) padded to the
    batch's sequence length with IGNORE -> (batch, seq)."""
    if labels and isinstance(labels[0], list):
        return torch.tensor([row + [IGNORE] * (seq - len(row)) for row in labels])
    return torch.tensor(labels)
