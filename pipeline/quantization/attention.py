"""Q/DQ on attention GEMMs through transformers' attention interface.

transformers 5 routes most encoders (BERT, RoBERTa, ALBERT, ELECTRA, XLM-R, DistilBERT, ModernBERT)
through `ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`. We register an eager-math function
named "qdq" that quantizes both inputs of Q.K^T and of P.V. It must be registered in
`AttentionMaskInterface` too: for an implementation name missing there, transformers builds no mask
at all and padding is silently attended to.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

ATTN_IMPLEMENTATION = "qdq"

# Modules seen by the attention function during a discovery forward (see `discover_attention_modules`).
_recorder: list[nn.Module] | None = None


def qdq_attention_forward(
    module: nn.Module,
    query: torch.Tensor,  # (batch, heads, q_len, head_dim)
    key: torch.Tensor,  # (batch, heads, kv_len, head_dim)
    value: torch.Tensor,  # (batch, heads, kv_len, head_dim)
    attention_mask: torch.Tensor | None,  # additive float mask (batch, 1, q_len, kv_len) from eager_mask
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention with optional quantizers (module.attn_quant) on the four GEMM inputs."""
    if _recorder is not None and module not in _recorder:
        _recorder.append(module)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    aq = getattr(module, "attn_quant", None)
    key_t = key.transpose(2, 3)  # quantize K^T itself so Q/DQ sits right at the MatMul input
    if aq is not None:
        # Scale Q before quantizing it: the same product, but the multiply runs on (.., q_len,
        # head_dim) instead of the (.., q_len, kv_len) scores, and Q/DQ sit right at the GEMM.
        scores = torch.matmul(aq.q(query * scaling), aq.k(key_t))
        value = aq.v(value)
    else:
        scores = torch.matmul(query, key_t) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(aq.probs(probs) if aq is not None else probs, value)
    return out.transpose(1, 2).contiguous(), probs


def register() -> None:
    """Register "qdq" in both interfaces (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, qdq_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, eager_mask)


def use_qdq_attention(model: nn.Module) -> None:
    """Switch a loaded model to the "qdq" attention implementation."""
    register()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)


@contextlib.contextmanager
def discover_attention_modules() -> Iterator[list[nn.Module]]:
    """Collect the modules that call the attention function during the forwards inside the block."""
    global _recorder
    _recorder = []
    try:
        yield _recorder
    finally:
        _recorder = None
