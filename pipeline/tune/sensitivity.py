"""Sensitivity of each fusion group, by a cheap proxy instead of one full evaluation per group.

Proxy: the mean KL(FP32 || quantized) of the output distribution on the `n` tuning examples where the
fully quantized model departs most from FP32 (the examples a fallback can flip), recomputed with one
group at a time back in float. score = KL(all quantized) - KL(group in float): how much of the
quantization damage on those examples that group alone accounts for. One forward over n examples per
group (n = tune.proxy_examples, 128 by default) instead of the whole tuning split; groups are then
tried in score order by the search, which verifies each on the full tuning split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pipeline.data.batching import Encoded
from pipeline.tune.groups import FusionGroup, set_float


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def kl_per_example(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(softmax(ref) || softmax(logits)) per row, (N,)."""
    lp, lq = log_softmax(ref_logits.astype(np.float64)), log_softmax(logits.astype(np.float64))
    return (np.exp(lp) * (lp - lq)).sum(-1)


def hardest(data: Encoded, ref_logits: np.ndarray, logits: np.ndarray, n: int) -> tuple[Encoded, np.ndarray]:
    """The n examples with the largest KL between FP32 and quantized logits (and their FP32 logits)."""
    idx = np.argsort(-kl_per_example(ref_logits, logits), kind="stable")[:n]
    idx = np.sort(idx)  # split order: the same batches every time
    return Encoded([data.features[i] for i in idx], [data.labels[i] for i in idx]), ref_logits[idx]


@dataclass
class Sensitivity:
    group: FusionGroup
    score: float  # KL(all quantized) - KL(this group in float), on the hardest examples
    kl: float  # KL with this group in float
    accuracy_effect: float | None = None  # tuning-accuracy change when the search tried it (points)


def rank_groups(
    groups: list[FusionGroup], quantizers: dict, subset_logits: Callable[[], np.ndarray], ref_logits: np.ndarray
) -> tuple[list[Sensitivity], float]:
    """Score every group (one forward over the hardest subset each); returns them most sensitive
    first, and the KL with every group quantized."""
    base = float(kl_per_example(ref_logits, subset_logits()).mean())
    out = []
    for g in groups:
        set_float(quantizers, g, True)
        try:
            kl = float(kl_per_example(ref_logits, subset_logits()).mean())
        finally:
            set_float(quantizers, g, False)
        out.append(Sensitivity(g, base - kl, kl))
    out.sort(key=lambda s: -s.score)
    return out, base
