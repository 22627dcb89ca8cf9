"""Q/DQ on attention GEMMs of models that bypass transformers' attention interface.

DeBERTa-v2/v3 (DisentangledSelfAttention) and MPNet (MPNetSelfAttention) compute attention with
their own torch.bmm / torch.matmul calls, including DeBERTa's disentangled position terms (c2p, p2c),
which are GEMMs too. A TorchFunctionMode, entered around each such module's forward by hooks,
intercepts every matmul/bmm and quantizes both operands. Quantizer pairs are indexed by call order
within one forward (deterministic for a given model): the first GEMM is Q.K^T (attn_q, attn_k), the
last is P.V (attn_probs unsigned, attn_v), those between are relative-position GEMMs (attn_rel).
The legacy ONNX exporter traces through the mode, so the Q/DQ land in the exported graph.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from pipeline.quantization.tensor_quantizer import TensorQuantizer

GEMM_FUNCS = {torch.matmul, torch.bmm, torch.Tensor.matmul, torch.Tensor.bmm, torch.Tensor.__matmul__}


class _CountGemms(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in GEMM_FUNCS:
            self.count += 1
        return func(*args, **(kwargs or {}))


class _QuantizeGemms(TorchFunctionMode):
    def __init__(self, pairs: nn.ModuleList):
        super().__init__()
        self.pairs = pairs
        self.i = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in GEMM_FUNCS and self.i < len(self.pairs):
            pair = self.pairs[self.i]
            self.i += 1
            args = (pair.a(args[0]), pair.b(args[1]), *args[2:])
        return func(*args, **kwargs)


class GemmPair(nn.Module):
    def __init__(self, a: TensorQuantizer, b: TensorQuantizer):
        super().__init__()
        self.a, self.b = a, b


class GemmQuantizers(nn.Module):
    """Quantizer pairs for one attention module's GEMMs, in call order; attached as `gemm_quant`."""

    def __init__(self, n_gemms: int, make: Callable[..., TensorQuantizer]):
        super().__init__()
        pairs = []
        for i in range(n_gemms):
            if i == 0:
                roles = (("attn_q", False), ("attn_k", False))
            elif i == n_gemms - 1:
                roles = (("attn_probs", True), ("attn_v", False))
            else:
                roles = (("attn_rel", False), ("attn_rel", False))
            pairs.append(GemmPair(*(make(r, unsigned=u) for r, u in roles)))
        self.pairs = nn.ModuleList(pairs)


def _pre_hook(module: nn.Module, args, kwargs):
    mode = _QuantizeGemms(module.gemm_quant.pairs)
    module._gemm_mode = mode
    mode.__enter__()


def _post_hook(module: nn.Module, args, kwargs, output):
    mode = module.__dict__.pop("_gemm_mode", None)
    if mode is not None:
        mode.__exit__(None, None, None)
    return output


def attach(
    model: nn.Module,
    classes: list[str],
    example: dict[str, torch.Tensor],
    keep: Callable[[str, nn.Module], bool],
    make: Callable[..., TensorQuantizer],
) -> int:
    """Attach GemmQuantizers + hooks to every module whose class name is in `classes` and whose quantizers
    `keep(module name, GemmQuantizers)` leaves on (it sets each one's `enabled`); returns count."""
    targets = [(n, m) for n, m in model.named_modules() if type(m).__name__ in classes]
    if not targets:
        return 0
    counters: dict[int, _CountGemms] = {}

    def count_pre(module, args, kwargs):
        counters[id(module)] = c = _CountGemms()
        c.__enter__()

    def count_post(module, args, kwargs, output):
        counters[id(module)].__exit__(None, None, None)
        return output

    handles = []
    for _, m in targets:
        handles.append(m.register_forward_pre_hook(count_pre, with_kwargs=True))
        handles.append(m.register_forward_hook(count_post, with_kwargs=True, always_call=True))
    try:
        with torch.no_grad():
            model.eval()
            model(**example)
    finally:
        for h in handles:
            h.remove()
    attached = 0
    for name, m in targets:
        n = counters[id(m)].count if id(m) in counters else 0
        if n == 0:
            continue
        gemm_quant = GemmQuantizers(n, make)
        if not keep(name, gemm_quant):
            continue
        m.gemm_quant = gemm_quant
        m.register_forward_pre_hook(_pre_hook, with_kwargs=True)
        m.register_forward_hook(_post_hook, with_kwargs=True, always_call=True)
        attached += 1
    return attached
