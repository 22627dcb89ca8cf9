"""Outlier migration (SmoothQuant-style) on Linear inputs, every GEMM still INT8.

A few channels of some activations (in BERT/MPNet the FFN second Linear's input, after GELU) are far larger
than the rest; one per-tensor INT8 scale then spends its range on them and rounds the others away. Per input
channel j of a Linear y = x W^T + b:

    s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)          (statistics from the calibration split)
    y   = (x * (1/s)) (W * s)^T + b                          (exact in real arithmetic)

The per-tensor input quantizer then sees x/s (outliers divided down), the per-output-channel weight
quantizer sees W*s (outliers multiplied in, where a per-channel scale absorbs them).

Where 1/s goes: SmoothQuant folds it into the preceding LayerNorm's gamma/beta. That is exact only when
the LayerNorm output feeds nothing but the smoothed Linears. BERT and MPNet are post-LayerNorm: each
LayerNorm output is also the residual stream (it is added to the next sub-layer's output), so dividing
gamma/beta by s changes the residual branch — not exact there. The FFN second Linear's input comes out of
GELU, which is not homogeneous (GELU(x/s) != GELU(x)/s), so there is no fold at all. Hence an explicit
per-channel Mul on the Linear's input branch (QuantLinear.smooth, exported Mul -> Q/DQ -> MatMul), exact
before quantization, with s folded into the weight. Its engine cost is measured, not assumed
(docs/results/base-model.md).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

import torch
from torch import nn

from pipeline.quantization.modules import QuantLinear
from pipeline.schema import SmoothingConfig

# Channels whose activation or weight column is (almost) zero keep s = 1 (nothing to migrate).
_EPS = 1e-5


def targets(model: nn.Module, cfg: SmoothingConfig) -> dict[str, QuantLinear]:
    """Quantized Linears whose module name matches one of `cfg.modules` (fnmatch globs)."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, QuantLinear) and any(fnmatch.fnmatchcase(name, p) for p in cfg.modules)
    }


@torch.no_grad()
def input_channel_max(
    model: nn.Module, mods: dict[str, QuantLinear], batches: Iterable[dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """max |x_j| over every token of every batch, per input channel j of each Linear in `mods` (shape (in,)).

    Runs before calibration: quantizers without amax pass tensors through, so these are FP32 statistics.
    """
    stats: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(_mod, args):
            x = args[0].detach()
            m = x.abs().reshape(-1, x.shape[-1]).amax(0).float().cpu()
            stats[name] = m if name not in stats else torch.maximum(stats[name], m)

        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in mods.items()]
    model.eval()
    try:
        for inputs in batches:
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return stats


def smoothing_scales(act_max: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """s (shape (in,)) = act_max^alpha / max|W_:,j|^(1-alpha); channels with no signal keep s = 1."""
    w_max = weight.detach().abs().amax(0).float().cpu()
    s = act_max.clamp(min=_EPS).pow(alpha) / w_max.clamp(min=_EPS).pow(1 - alpha)
    dead = (act_max <= _EPS) | (w_max <= _EPS)
    return torch.where(dead, torch.ones_like(s), s)


@torch.no_grad()
def apply(mod: QuantLinear, s: torch.Tensor) -> None:
    """Fold s into the weight columns and put 1/s on the input branch (y unchanged in FP32)."""
    s = s.to(device=mod.weight.device, dtype=mod.weight.dtype)
    mod.weight.mul_(s)  # (out, in) * (in,): column j scaled by s_j
    mod.smooth = (1.0 / s).contiguous()


@torch.no_grad()
def smooth(model: nn.Module, cfg: SmoothingConfig, batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Migrate outliers of the selected Linears' inputs into their weights; returns s by module name."""
    mods = targets(model, cfg)
    if not mods:
        raise ValueError(f"smoothing.modules: {cfg.modules} matches no quantized Linear in this model")
    stats = input_channel_max(model, mods, batches)
    scales = {}
    for name, mod in mods.items():
        if name not in stats:  # never reached by the calibration batches: leave it alone
            continue
        scales[name] = smoothing_scales(stats[name], mod.weight, cfg.alpha)
        apply(mod, scales[name])
    return scales


def restore(model: nn.Module, scales: dict[str, torch.Tensor]) -> None:
    """Re-apply saved scales to an unsmoothed model (a calibrate cache hit)."""
    for name, s in scales.items():
        apply(model.get_submodule(name), s)


def summary(scales: dict[str, torch.Tensor], alpha: float) -> dict:
    """metrics.json quantization.smoothing: how many Linears, and how far s spreads."""
    if not scales:
        return {"alpha": alpha, "modules": 0}
    allv = torch.cat([s.flatten() for s in scales.values()])
    return {"alpha": alpha, "modules": len(scales), "scale_min": float(allv.min()), "scale_max": float(allv.max())}
