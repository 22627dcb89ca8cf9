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
    labels: torch.Tensor  # (batch,)
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
        yield Batch({k: v.to(torch.long) for k, v in padded.items()}, torch.tensor([data.labels[i] for i in idx]), idx)
