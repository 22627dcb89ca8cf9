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

Migration moves an outlier channel's range into its weight column, and the per-output-channel weight scale of
every output row that column feeds then grows with it. Splitting (smoothing.method=split, outlier channel
splitting) leaves the weights' ranges alone: channel j becomes m_j copies of x_j / m_j and its weight column is
copied m_j times, so

    y = sum_j sum_{c < m_j} (x_j / m_j) W_:,j + b                 (exact in real arithmetic)

and no copy exceeds `split_ratio` x the median channel's max: the per-tensor input scale shrinks by the outlier
factor for every channel, at the cost of sum_j (m_j - 1) more input channels in that GEMM (at most `max_extra`
of them). Exported as Gather -> Mul(1/m) -> Q/DQ -> MatMul.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from pipeline.quantization import calibration_plot
from pipeline.quantization.calibrate import calibrate
from pipeline.quantization.modules import QuantLinear
from pipeline.quantization.tensor_quantizer import TensorQuantizer
from pipeline.schema import CalibrationConfig, QuantRule, SmoothingConfig

# Channels whose activation or weight column is (almost) zero keep s = 1 (nothing to migrate).
_EPS = 1e-5


def targets(model: nn.Module, cfg: SmoothingConfig) -> dict[str, QuantLinear]:
    """Quantized Linears whose module name matches one of `cfg.modules` (fnmatch globs); a Linear whose input
    quantizer quant.rules switched off is left alone (its input stays float: nothing to gain, a Mul to pay)."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, QuantLinear) and m.input_quantizer.enabled and any(fnmatch.fnmatchcase(name, p) for p in cfg.modules)
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


def split_counts(act_max: torch.Tensor, ratio: float, max_extra: float) -> torch.Tensor:
    """m_j >= 1 (shape (in,)): copies of channel j so that no copy's max exceeds ratio x the median channel's max;
    where that would add more than max_extra x in channels, the limit rises (by 10 %) until it does not."""
    limit = float(act_max.median().clamp(min=_EPS)) * ratio
    budget = max(0, int(max_extra * act_max.numel()))  # >= 0: the loop ends at the latest when limit >= max (all m = 1)
    while True:
        m = torch.ceil(act_max / limit).clamp(min=1.0)
        if int((m - 1).sum()) <= budget:
            return m
        limit *= 1.1


@torch.no_grad()
def apply_split(mod: QuantLinear, m: torch.Tensor) -> None:
    """Channel j -> m_j copies of x_j / m_j (Gather, then Mul), weight column j copied m_j times (y unchanged in FP32)."""
    dev = mod.weight.device
    idx = torch.repeat_interleave(torch.arange(m.numel()), m.long()).to(dev)
    mod.weight = nn.Parameter(mod.weight.detach()[:, idx].contiguous(), requires_grad=mod.weight.requires_grad)
    mod.in_features = int(idx.numel())
    mod.split_index = idx
    mod.smooth = (1.0 / m.to(device=dev, dtype=mod.weight.dtype))[idx].contiguous()


@torch.no_grad()
def smooth(
    model: nn.Module, cfg: SmoothingConfig, batches: list[dict[str, torch.Tensor]], mods: dict[str, QuantLinear] | None = None
) -> dict[str, torch.Tensor]:
    """Migrate (method migrate: returns s) or split (method split: returns m, Linears with an m_j > 1 only) the
    outliers of the selected Linears' inputs (`mods`: default `targets(model, cfg)`), by module name."""
    mods = targets(model, cfg) if mods is None else mods
    if not mods:
        raise ValueError(f"smoothing.modules: {cfg.modules} matches no quantized Linear in this model")
    stats = input_channel_max(model, mods, batches)
    scales = {}
    for name, mod in mods.items():
        if name not in stats:  # never reached by the calibration batches: leave it alone
            continue
        if cfg.method == "split":
            m = split_counts(stats[name], cfg.split_ratio, cfg.max_extra)
            if bool((m > 1).any()):  # nothing to split: no Gather in the graph
                scales[name] = m
        else:
            scales[name] = smoothing_scales(stats[name], mod.weight, cfg.alpha)
    restore(model, scales, cfg.method)
    return scales


@contextlib.contextmanager
def quantizers_off(quantizers: dict[str, TensorQuantizer]) -> Iterator[None]:
    """Every quantizer passes its tensor through inside the block (FP32 statistics); as it was after."""
    was = {n: q.enabled for n, q in quantizers.items()}
    for q in quantizers.values():
        q.enabled = False
    try:
        yield
    finally:
        for n, q in quantizers.items():
            q.enabled = was[n]


def split_calibrated(
    model: nn.Module,
    quantizers: dict[str, TensorQuantizer],
    cfg: SmoothingConfig,
    batches: list[dict[str, torch.Tensor]],
    calibration: CalibrationConfig,
    rules: list[QuantRule] = (),
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, tuple[nn.Parameter, int]]]:
    """Split the outliers of an already calibrated model (tune=auto's step): FP32 statistics, then only the split
    Linears' quantizers re-calibrated (their input tensors changed; every other quantizer sees what it saw).

    Returns (m by module name, the new inputs' histograms in the calibrate stage's layout, what `unsplit` needs)."""
    mods = targets(model, cfg)
    originals = {n: (m.weight, m.in_features) for n, m in mods.items()}
    hists: dict[str, torch.Tensor] = {}
    with quantizers_off(quantizers):  # targets() chosen before: it reads which input quantizers are on
        counts = smooth(model, cfg, batches, mods)
        mine = {k: quantizers[k] for n in counts for k in (f"{n}.input_quantizer", f"{n}.weight_quantizer") if k in quantizers}
        if mine:
            calibrate(model, mine, batches, calibration, on_collected=lambda qs: hists.update(calibration_plot.histograms(qs)), rules=rules)
    return counts, hists, {n: originals[n] for n in counts}


@torch.no_grad()
def unsplit(model: nn.Module, originals: dict[str, tuple[nn.Parameter, int]]) -> None:
    """Undo `split_calibrated` on the model (the caller restores the quantizers' amax)."""
    for name, (weight, in_features) in originals.items():
        mod = model.get_submodule(name)
        mod.weight, mod.in_features, mod.split_index, mod.smooth = weight, in_features, None, None


def restore(model: nn.Module, scales: dict[str, torch.Tensor], method: str = "migrate") -> None:
    """Apply saved scales (or split counts) to a model without them (also a calibrate cache hit)."""
    for name, s in scales.items():
        (apply_split if method == "split" else apply)(model.get_submodule(name), s)


def summary(scales: dict[str, torch.Tensor], cfg: SmoothingConfig) -> dict:
    """metrics.json quantization.smoothing: how many Linears, and how far s spreads (split: the channels added)."""
    out: dict = {"method": cfg.method, "modules": len(scales)}
    if cfg.method == "split":
        out.update(split_ratio=cfg.split_ratio, extra_channels={n: int((m - 1).sum()) for n, m in scales.items()})
        return out
    out["alpha"] = cfg.alpha
    if scales:
        allv = torch.cat([s.flatten() for s in scales.values()])
        out.update(scale_min=float(allv.min()), scale_max=float(allv.max()))
    return out
