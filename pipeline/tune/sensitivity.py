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
from pipeline.inference import kl_per_example
from pipeline.tune.groups import FusionGroup, set_float

# Per-example distance of outputs from the FP32 reference (the task's divergence; classification: KL).
Divergence = Callable[[object, object], np.ndarray]


def hardest(data: Encoded, ref_logits, logits, n: int, divergence: Divergence = kl_per_example) -> tuple[Encoded, object]:
    """The n examples whose outputs depart most from FP32 (and their FP32 outputs)."""
    idx = np.argsort(-divergence(ref_logits, logits), kind="stable")[:n]
    idx = np.sort(idx)  # split order: the same batches every time
    ref = [ref_logits[i] for i in idx] if isinstance(ref_logits, list) else ref_logits[idx]
    return Encoded([data.features[i] for i in idx], [data.labels[i] for i in idx]), ref


@dataclass
class Sensitivity:
    group: FusionGroup
    score: float  # KL(all quantized) - KL(this group in float), on the hardest examples
    kl: float  # KL with this group in float
    accuracy_effect: float | None = None  # tuning-accuracy change when the search tried it (points)


def rank_groups(
    groups: list[FusionGroup],
    quantizers: dict,
    subset_logits: Callable[[], object],
    ref_logits,
    divergence: Divergence = kl_per_example,
) -> tuple[list[Sensitivity], float]:
    """Score every group (one forward over the hardest subset each); returns them most sensitive
    first, and the divergence with every group quantized."""
    base = float(divergence(ref_logits, subset_logits()).mean())
    out = []
    for g in groups:
        set_float(quantizers, g, True)
        try:
            kl = float(divergence(ref_logits, subset_logits()).mean())
        finally:
            set_float(quantizers, g, False)
        out.append(Sensitivity(g, base - kl, kl))
    out.sort(key=lambda s: -s.score)
    return out, base
