"""Forward passes over a split and the measures that compare their outputs (library layer).

Every stage, task, search and script that needs "the outputs of this model / engine on this split"
calls these, so all of them batch, pad and order examples the same way:
- `torch_logits` / `engine_logits`: the graph output of a torch model or a built engine, over
  length-sorted batches (less padding), returned in the split's order.
- `kl_per_example`, `accuracy`, `paired_drop_ci95`: fidelity and accuracy measures of those outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch

from pipeline.data import batches
from pipeline.data.batching import Batch, Encoded

# One output of a whole eval split: stacked (N, ...) for sentence-level outputs; for token-level ones
# a list of (length_i, ...) arrays, each trimmed to its example's tokens.
Outputs = np.ndarray | list[np.ndarray]


def collect(forward: Callable[[Batch], np.ndarray], batch_iter: Iterable[Batch], data: Encoded, token_level: bool) -> Outputs:
    """forward(batch) -> (batch, ...) array over possibly length-sorted batches, returned in split order.

    Token-level outputs are padded to each batch's longest example: each row is cut to its own length.
    """
    out: dict[int, np.ndarray] = {}
    for b in batch_iter:
        res = forward(b)
        for j, i in enumerate(b.index):
            out[i] = res[j][: len(data.features[i]["input_ids"])] if token_level else res[j]
    rows = [out[i] for i in sorted(out)]
    return rows if token_level else np.stack(rows)


def _ordered(tokenizer, data: Encoded, batch_size: int, limit: int | None, forward, token_level: bool) -> Outputs:
    return collect(forward, batches(tokenizer, data, batch_size, sort_by_length=True, limit=limit), data, token_level)


@torch.no_grad()
def torch_logits(
    model: torch.nn.Module,
    tokenizer,
    data: Encoded,
    batch_size: int,
    device: torch.device,
    limit: int | None = None,
    token_level: bool = False,
) -> Outputs:
    """The graph output of a torch model (logits (N, num_labels); the task's output), in the split's order."""
    model.eval()
    return _ordered(tokenizer, data, batch_size, limit, lambda b: model(**b.to(device).inputs).logits.float().cpu().numpy(), token_level)


def engine_logits(engine, tokenizer, data: Encoded, batch_size: int, limit: int | None = None, token_level: bool = False) -> Outputs:
    """The output of a built engine (logits (N, num_labels); the task's output), in the split's order."""
    return _ordered(tokenizer, data, batch_size, limit, lambda b: engine.run({k: v.numpy() for k, v in b.inputs.items()}), token_level)


def accuracy(logits: np.ndarray, labels: list[int]) -> float:
    return float((logits.argmax(-1) == np.asarray(labels[: len(logits)])).mean())


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def kl_per_example(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(softmax(ref) || softmax(logits)) per row, (N,)."""
    lp, lq = log_softmax(ref_logits.astype(np.float64)), log_softmax(logits.astype(np.float64))
    return (np.exp(lp) * (lp - lq)).sum(-1)


def expected_loss_softmax(reference: np.ndarray, outputs: np.ndarray) -> np.ndarray:
    """Per row: p_FP32(FP32's answer) - p_FP32(quantized answer) — the accuracy FP32's own probabilities
    expect the quantized answer to lose (0 where the answers agree), for (N, classes) logits."""
    ref = np.asarray(reference, dtype=np.float64)
    p = np.exp(ref - ref.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    rows = np.arange(len(p))
    return p[rows, ref.argmax(-1)] - p[rows, np.asarray(outputs).argmax(-1)]


def paired_drop_ci95(ref_correct: np.ndarray, q_correct: np.ndarray) -> float:
    """Half-width (percentage points) of the 95 % interval of an accuracy drop, paired over the same
    examples: the per-example difference (reference right) - (quantized right) in {-1, 0, 1}, normal
    approximation. Tells how far a measured drop can be from the drop on new data of the same kind."""
    d = ref_correct.astype(np.float64) - q_correct.astype(np.float64)
    if len(d) < 2:
        return float("inf")
    return 100 * 1.96 * float(d.std(ddof=1)) / np.sqrt(len(d))
