"""Every calibrator's activation amax from the one calibration pass.

The calibrate stage keeps the histograms it collected (`calibration_histograms.safetensors`, also in its
cache entry) before computing amax; here each candidate method recomputes amax from exactly those
histograms with the project's own calibrator code (pipeline.quantization.calibrate.METHODS), so
choosing among six calibrators costs no second pass over the calibration data, and the candidate
equal to the run's own method gives bit-identical amax (tests/test_tune.py checks it).

Weights are per-channel max in every mode (unchanged here). Activation quantizers without a histogram
(per-channel, or never reached) keep their amax.

Refinement (tune.calibrator_per): after the global choice, the best candidate per group of activation
quantizers — by role (every linear_input, every attn_q, ...) or by slot (one tensor position in every layer:
the Q/K/V Linears' input, the FFN second Linear's input, ...). The result is a list of quant.rules
(pipeline/quantization/rules.py), so a tuned plan and a hand-written config are one mechanism: the plan
applies its rules through the same function.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from pipeline.quantization import calibration_plot
from pipeline.quantization import rules as qrules
from pipeline.quantization.calibrate import METHODS
from pipeline.quantization.calibrators import HistogramCalibrator
from pipeline.quantization.slots import position, position_globs
from pipeline.schema import CalibrationConfig, QuantRule

log = logging.getLogger(__name__)

# Candidate name -> the calibration settings it stands for (names as the conf/calibration options).
CANDIDATES: dict[str, dict] = {
    "max": {"method": "max"},
    "percentile_99_9": {"method": "percentile", "percentile": 99.9},
    "percentile_99_99": {"method": "percentile", "percentile": 99.99},
    "percentile_99_999": {"method": "percentile", "percentile": 99.999},
    "entropy": {"method": "entropy"},
    "mse": {"method": "mse"},
}


def candidate_config(name: str, base: CalibrationConfig) -> CalibrationConfig:
    """The run's calibration settings (bins, stride, start_bin) with this candidate's method everywhere."""
    return dataclasses.replace(base, **CANDIDATES[name])


def override_rule(selector: dict, name: str) -> dict:
    """A quant.rules rule (as a dict) giving candidate `name` to the quantizers `selector` picks
    ({"roles": [...]} or {"name": [...]})."""
    c = CANDIDATES[name]
    return qrules.to_dict(QuantRule(name=list(selector.get("name", [])), roles=list(selector.get("roles", [])), method=c["method"],
                                    percentile=c.get("percentile")))  # fmt: skip


def calibration_groups(per: str, hists: dict, quantizers: dict) -> dict[str, tuple[dict, list[str]]]:
    """Activation quantizers with a histogram, grouped for the per-group refinement:
    {label: (selector of the override rule, quantizer names)}.

    per="role": one group per role. per="slot": one group per position in the layer (the name with its
    layer index wildcarded); positions that observe the same tensor in every layer (identical histograms:
    Q, K and V Linears share their input) are one slot, so they keep one range."""
    names = [n for n in hists if n in quantizers]
    if per == "role":
        roles: dict[str, list[str]] = {}
        for n in names:
            roles.setdefault(quantizers[n].role, []).append(n)
        return {r: ({"roles": [r]}, ns) for r, ns in roles.items()}
    slots: dict[str, list[str]] = {}
    for n in names:
        slots.setdefault(position(n), []).append(n)
    merged: dict[tuple, tuple[list[str], list[str]]] = {}  # histogram signature -> (slot labels, names)
    for label, members in slots.items():
        sig = tuple((hists[n][0].numpy().tobytes(), hists[n][1].numpy().tobytes()) for n in members)
        labels, ns = merged.setdefault(sig, ([], []))
        labels.append(label)
        ns.extend(members)
    return {" | ".join(labels): ({"name": [g for lb in labels for g in position_globs(slots[lb])]}, ns) for labels, ns in merged.values()}


def own_candidate(c: CalibrationConfig, rules: list[QuantRule] = ()) -> str | None:
    """Which candidate the run's own calibration is (None: a percentile not in the list, or rules that
    give some quantizers another method)."""
    if qrules.methods(rules) or any(r.percentile is not None for r in rules):
        return None
    for name in CANDIDATES:
        if candidate_config(name, c) == c:
            return name
    return None


def load_histograms(run_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{quantizer name: (counts, edges)} as the calibrate stage saved them."""
    path = run_dir / calibration_plot.HISTOGRAMS
    if not path.exists():
        return {}
    return histogram_pairs(load_file(str(path)))


def histogram_pairs(flat: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"<q>.hist": counts, "<q>.edges": edges} (the saved layout) -> {q: (counts, edges)}."""
    return {k[: -len(".hist")]: (v, flat[k[: -len(".hist")] + ".edges"]) for k, v in flat.items() if k.endswith(".hist")}


def _histogram_max(counts: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """ "max" from a histogram: the upper edge of the last non-empty bin (within one bin of the true max)."""
    nonzero = torch.nonzero(counts).flatten()
    return edges[int(nonzero[-1]) + 1].clone() if len(nonzero) else torch.tensor(0.0)


def candidate_amax(
    name: str,
    hists: dict[str, tuple[torch.Tensor, torch.Tensor]],
    quantizers: dict,
    base: CalibrationConfig,
    rules: list | None = None,
) -> dict[str, torch.Tensor]:
    """Activation amax by quantizer name for candidate `name` everywhere, then `rules` (quant.rules, dicts or
    QuantRule: the tuner's per-group choices; the run's own method rules are not kept, a candidate stands for
    one method), from the saved histograms."""
    run = candidate_config(name, base)
    rules = qrules.as_rules(rules)
    out = {}
    for qname, (counts, edges) in hists.items():
        q = quantizers.get(qname)
        if q is None:
            continue
        cfg = qrules.calibration_for(qname, q.role, run, rules)
        if cfg.method == "max":
            out[qname] = _histogram_max(counts, edges)
            continue
        cal = HistogramCalibrator(q.num_bits, None, q.unsigned)
        cal._calib_hist, cal._calib_bin_edges = counts, edges  # the calibrator's own state, as collected
        amax = METHODS[cfg.method](cal, cfg)
        if amax is not None:
            out[qname] = amax
    return out


@torch.no_grad()
def apply_amax(quantizers: dict, amax: dict[str, torch.Tensor], device: torch.device) -> None:
    for name, a in amax.items():
        quantizers[name].load_amax(a)
        quantizers[name].amax = quantizers[name].amax.to(device)


def choose_per_group(
    groups: dict[str, list[str]],
    candidates: dict[str, dict[str, torch.Tensor]],
    best: str,
    score: Callable[[], Any],
    apply: Callable[[dict[str, torch.Tensor]], None],
    key: Callable[[Any], Any] = lambda s: s,
) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """Per-group refinement of the global choice `best` (one pass of coordinate descent): for each group
    (label -> its quantizer names), try every other candidate on that group's quantizers alone, the
    others as chosen so far, and keep it when the tuning score improves (`key(score)` larger = better,
    e.g. Score.rank). `score()` evaluates the model as it is now. Returns ({label: candidate} for the groups
    that changed, {label: {candidate: score}} of every evaluation); the model is left refined."""
    current = score()
    chosen: dict[str, str] = {}
    tried: dict[str, dict[str, Any]] = {}
    for label, names in groups.items():
        tried[label] = {best: current}
        for cand in candidates:
            if cand == chosen.get(label, best):
                continue
            apply({n: candidates[cand][n] for n in names if n in candidates[cand]})
            s = score()
            tried[label][cand] = s
            log.info("tune: %s -> %s: score %s (best so far %s)", label, cand, s, current)
            if key(s) > key(current):
                current, chosen[label] = s, cand
            else:
                keep = chosen.get(label, best)
                apply({n: candidates[keep][n] for n in names if n in candidates[keep]})
    return chosen, tried
