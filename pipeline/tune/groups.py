"""Fusion groups: the quantizers that must change precision together.

An engine runs a GEMM in INT8 only when *both* of its inputs come through Q/DQ (ONNX Runtime fuses
DQ(x), DQ(W) -> MatMul into MatMulIntegerToFloat; TensorRT needs the same for an INT8 GEMM). Returning
one input to float leaves a lone Q/DQ pair on the other: the GEMM runs in float anyway and the
remaining Q/DQ only costs time and accuracy. So the search never moves single quantizers, only groups:

- linear:   a Linear's input + weight quantizer               (x · Wᵀ)
- attn_qk:  attention Q + Kᵀ                                   (Q · Kᵀ)
- attn_pv:  attention probabilities + V                        (P · V)
- attn_rel: one relative-position GEMM's two inputs (DeBERTa, matmul interception)
- residual: the quantizer on a residual sum (LayerNorm input), alone
Anything else is a group of its own. Derived from the quantizer names and roles (pipeline/quantization).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# (name pattern, group kind); group name = the pattern's "m" (owning module) + the suffix.
_RULES: list[tuple[re.Pattern[str], str, str]] = [
    (re.compile(r"(?P<m>.+)\.(input|weight)_quantizer"), "linear", ""),
    (re.compile(r"(?P<m>.+)\.attn_quant\.(q|k)"), "attn_qk", ":qk"),
    (re.compile(r"(?P<m>.+)\.attn_quant\.(probs|v)"), "attn_pv", ":pv"),
    (re.compile(r"(?P<m>.+)\.residual_quantizer"), "residual", ""),
]
# Attention GEMMs found by matmul interception: one GemmPair (a, b) per GEMM, kind from its roles.
_PAIR = re.compile(r"(?P<m>.+)\.gemm_quant\.pairs\.(?P<i>\d+)\.(a|b)")
_PAIR_KIND = {"attn_q": ("attn_qk", ":qk"), "attn_k": ("attn_qk", ":qk"), "attn_probs": ("attn_pv", ":pv"), "attn_v": ("attn_pv", ":pv")}


@dataclass(frozen=True)
class FusionGroup:
    name: str  # e.g. "bert.encoder.layer.3.output.dense", "bert.encoder.layer.3.attention.self:qk"
    kind: str  # linear | attn_qk | attn_pv | attn_rel | residual | other
    quantizers: tuple[str, ...]  # quantizer names, in model order


def group_of(name: str, role: str) -> tuple[str, str]:
    """(group name, kind) of one quantizer."""
    pair = _PAIR.fullmatch(name)
    if pair:
        kind, suffix = _PAIR_KIND.get(role, ("attn_rel", f":rel{pair['i']}"))
        return pair["m"] + suffix, kind
    for pattern, kind, suffix in _RULES:
        match = pattern.fullmatch(name)
        if match:
            return match["m"] + suffix, kind
    return name, "other"


def fusion_groups(roles: dict[str, str]) -> list[FusionGroup]:
    """Partition quantizers {name: role} into fusion groups, in model order."""
    members: dict[str, list[str]] = {}
    kinds: dict[str, str] = {}
    for name, role in roles.items():
        group, kind = group_of(name, role)
        members.setdefault(group, []).append(name)
        kinds[group] = kind
    return [FusionGroup(g, kinds[g], tuple(names)) for g, names in members.items()]


def active_groups(quantizers: dict) -> list[FusionGroup]:
    """Fusion groups of the quantizers that are on (enabled and calibrated) in a model."""
    on = {n: q.role for n, q in quantizers.items() if q.enabled and q.amax is not None}
    return fusion_groups(on)


def set_float(quantizers: dict, group: FusionGroup, to_float: bool) -> None:
    """Return a group to float (quantizers off) or quantize it again."""
    for name in group.quantizers:
        quantizers[name].enabled = not to_float
