"""Split containers and label encoding shared by every data source."""

from __future__ import annotations

import random
from dataclasses import dataclass


class DataError(ValueError):
    """Bad data: a missing file or column, an unknown label. The message names the config key."""


@dataclass
class Split:
    texts: list[str]
    labels: list[int]
    pairs: list[str] | None = None  # second segment for sentence-pair tasks (NLI)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: list[int]) -> Split:
        return Split(
            [self.texts[i] for i in idx], [self.labels[i] for i in idx], None if self.pairs is None else [self.pairs[i] for i in idx]
        )


@dataclass
class DataSplits:
    train: Split
    calib: Split
    eval: Split
    label_names: list[str]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def seeded_order(n: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def take(split: Split, n: int | None, seed: int) -> Split:
    """A seeded random subset of n examples (all of them, shuffled, when n is None or >= len)."""
    order = seeded_order(len(split), seed)
    return split.subset(order if n is None else order[:n])


def encode_labels(train_raw: list, eval_raw: list, names: list[str] | None, key: str) -> tuple[list[int], list[int], list[str]]:
    """Map raw labels (ints or strings) to ids 0..K-1; returns (train ids, eval ids, label names).

    Ints are kept as ids (names "0".."K-1"). Strings map through `names` when given (data.labels),
    else through their sorted set in the training data. An eval label unseen in training is an error.
    """

    def as_int(v):
        if isinstance(v, bool):
            return None
        if isinstance(v, int):
            return v
        if isinstance(v, float) and v.is_integer():
            return int(v)
        if isinstance(v, str) and v.strip().lstrip("-").isdigit():
            return int(v.strip())
        return None

    if names is None and all(as_int(v) is not None for v in train_raw + eval_raw):
        tr, ev = [as_int(v) for v in train_raw], [as_int(v) for v in eval_raw]
        if min(tr + ev) < 0:
            raise DataError(f"{key}: integer labels must be >= 0, got {min(tr + ev)}")
        k = max(tr + ev) + 1
        return tr, ev, [str(i) for i in range(k)]
    names = [str(n) for n in names] if names is not None else sorted({str(v) for v in train_raw})
    index = {n: i for i, n in enumerate(names)}
    ids = []
    for part in (train_raw, eval_raw):
        out = []
        for v in part:
            if str(v) not in index:
                raise DataError(f"{key}: label {v!r} is not among the labels {names} (set data.labels to list them all)")
            out.append(index[str(v)])
        ids.append(out)
    return ids[0], ids[1], names
