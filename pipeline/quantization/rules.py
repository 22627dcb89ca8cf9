"""Quantizer-selection rules (config key `quant.rules`): the one mechanism that says which quantizers are on
and how each activation is calibrated.

A rule picks quantizers by name glob (fnmatch over quant_map.json names) AND role, and sets any of
`enable`, `method`, `percentile`. Rules apply in order and the later one wins per field, as NVIDIA
ModelOpt's wildcard `quant_cfg` does; a field a rule leaves null keeps what earlier rules (or the
calibration group) gave. The placement of the task heads (conf/quant/*.yaml `heads`), per-slot calibration
presets (conf/calibration/percentile_qkv_mse.yaml), what the tuner chooses per role or slot and the fusion
groups it returns to float (tuned_quant.yaml `rules`) are all such rules.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from pipeline.quantization.tensor_quantizer import TensorQuantizer
from pipeline.schema import CalibrationConfig, QuantRule

FIELDS = ("enable", "method", "percentile")


def as_rules(rules: Mapping[str, Any] | Iterable[Any] | None) -> list[QuantRule]:
    """quant.rules (label -> rule) or a list of rules (as dicts or QuantRule), in order."""
    if rules is None:
        return []
    items = rules.values() if isinstance(rules, Mapping) else rules
    return [r if isinstance(r, QuantRule) else QuantRule(**r) for r in items if r is not None]


def matches(rule: QuantRule, name: str, role: str) -> bool:
    return (not rule.name or any(fnmatch.fnmatchcase(name, g) for g in rule.name)) and (not rule.roles or role in rule.roles)


def resolve(name: str, role: str, rules: Iterable[QuantRule]) -> dict[str, Any]:
    """The fields the rules set for one quantizer (later rules win per field); {} when none matches.
    Method and percentile never apply to weights (always per-channel max)."""
    out: dict[str, Any] = {}
    for r in rules:
        if matches(r, name, role):
            for f in FIELDS:
                if getattr(r, f) is not None and not (f != "enable" and role == "linear_weight"):
                    out[f] = getattr(r, f)
    return out


def enabled(name: str, role: str, rules: Iterable[QuantRule]) -> bool:
    return resolve(name, role, rules).get("enable", True)


def apply_enable(prefix: str, module: nn.Module, rules: list[QuantRule]) -> bool:
    """Set `enabled` on the quantizers of a quantized wrapper about to be placed at `prefix`; False when
    none stays on (the caller then leaves the original module in float, with no quantizers at all)."""
    on = False
    for sub, q in module.named_modules():
        if isinstance(q, TensorQuantizer):
            q.enabled = enabled(f"{prefix}.{sub}" if sub else prefix, q.role, rules)
            on = on or q.enabled
    return on


def calibration_for(name: str, role: str, cfg: CalibrationConfig, rules: Iterable[QuantRule]) -> CalibrationConfig:
    """The calibration settings of one activation quantizer: `cfg` with the rules' method / percentile."""
    fields = resolve(name, role, rules)
    if "method" not in fields and "percentile" not in fields:
        return cfg
    return dataclasses.replace(cfg, method=fields.get("method", cfg.method), percentile=fields.get("percentile", cfg.percentile))


def methods(rules: Iterable[QuantRule]) -> set[str]:
    """Calibration methods the rules name (a histogram method needs histograms collected)."""
    return {r.method for r in rules if r.method is not None}


def to_dict(rule: QuantRule) -> dict[str, Any]:
    """A rule as written in YAML (tuned_quant.yaml, config.resolved.yaml): only the fields it sets."""
    d = dataclasses.asdict(rule)
    return {k: v for k, v in d.items() if v not in (None, [])}
