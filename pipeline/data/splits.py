"""Split containers and the error every data source raises."""

from __future__ import annotations

import random
from dataclasses import dataclass

from pipeline.schema import ConfigError

# How many problems an error lists before it summarizes the rest as a count.
LIST_LIMIT = 20


def first_of(lines: list[str], limit: int = LIST_LIMIT) -> list[str]:
    """The first `limit` lines, then one line counting the rest (a 10,000-row file with a wrong
    label column should print a screenful, not 10,000 lines)."""
    if len(lines) <= limit:
        return list(lines)
    return lines[:limit] + [f"... and {len(lines) - limit} more ({len(lines)} in all)"]


class DataError(ConfigError):
    """Bad data: every problem found, one line each, naming the config key, file, line and column.

    A ConfigError, so the CLI prints it as a list and exits 2 without a traceback, wherever it is
    raised (the pre-flight for local files; the load stage for hub datasets). `problems` holds all
    of them; `errors` (and the message) the first LIST_LIMIT and a count.
    """

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__(first_of(self.problems))


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
    # Held-out examples for decisions (tune stage, QAT best state); disjoint from train, calib and eval.
    tune: Split | None = None

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def seeded_order(n: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


# data.num_tune=null: this many tuning examples, at most a tenth of the training data.
AUTO_TUNE, AUTO_TUNE_FRACTION = 400, 10


def tune_size(requested: int | None, available: int) -> int:
    return min(AUTO_TUNE, available // AUTO_TUNE_FRACTION) if requested is None else requested


def take(split: Split, n: int | None, seed: int) -> Split:
    """A seeded random subset of n examples (all of them, shuffled, when n is None or >= len)."""
    order = seeded_order(len(split), seed)
    return split.subset(order if n is None else order[:n])
