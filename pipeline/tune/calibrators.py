"""Every calibrator's activation amax from the one calibration pass.

The calibrate stage keeps the histograms it collected (`calibration_histograms.safetensors`, also in its
cache entry) before computing amax; here each candidate method recomputes amax from exactly those
histograms with the project's own calibrator code (pipeline.quantization.calibrate.METHODS), so
choosing among six calibrators costs no second pass over the calibration data, and the candidate
equal to the run's own method gives bit-identical amax (tests/test_tune.py checks it).

Weights are per-channel max in every mode (unchanged here). Activation quantizers without a histogram
(per-channel, or never reached) keep their amax.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline.quantization import calibration_plot
from pipeline.quantization.calibrate import METHODS
from pipeline.quantization.calibrators import HistogramCalibrator
from pipeline.schema import CalibrationConfig

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
    """The run's calibration settings (bins, stride, start_bin) with this candidate's method."""
    return dataclasses.replace(base, **CANDIDATES[name])


def own_candidate(c: CalibrationConfig) -> str | None:
    """Which candidate the run's own calibration is (None: a percentile not in the list)."""
    for name in CANDIDATES:
        if candidate_config(name, c) == c:
            return name
    return None


def load_histograms(run_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{quantizer name: (counts, edges)} as the calibrate stage saved them."""
    path = run_dir / calibration_plot.HISTOGRAMS
    if not path.exists():
        return {}
    flat = load_file(str(path))
    return {k[: -len(".hist")]: (v, flat[k[: -len(".hist")] + ".edges"]) for k, v in flat.items() if k.endswith(".hist")}


def _histogram_max(counts: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """ "max" from a histogram: the upper edge of the last non-empty bin (within one bin of the true max)."""
    nonzero = torch.nonzero(counts).flatten()
    return edges[int(nonzero[-1]) + 1].clone() if len(nonzero) else torch.tensor(0.0)


def candidate_amax(
    name: str, hists: dict[str, tuple[torch.Tensor, torch.Tensor]], quantizers: dict, base: CalibrationConfig
) -> dict[str, torch.Tensor]:
    """Activation amax by quantizer name for candidate `name`, from the saved histograms."""
    cfg = candidate_config(name, base)
    out = {}
    for qname, (counts, edges) in hists.items():
        q = quantizers.get(qname)
        if q is None:
            continue
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


def choose_per_role(
    roles: dict[str, list[str]],
    candidates: dict[str, dict[str, torch.Tensor]],
    best: str,
    score: Callable[[], tuple[float, float]],
    apply: Callable[[dict[str, torch.Tensor]], None],
) -> tuple[dict[str, str], int]:
    """Per-role refinement of the global choice `best`: for each role (its quantizer names in `roles`),
    try every other candidate on that role's quantizers alone and keep it when the tuning score
    (accuracy, -KL) improves. `score()` evaluates the model as it is now. Returns ({role: candidate}
    for the roles that changed, evaluations spent); the model is left in the refined state."""
    current = score()
    chosen: dict[str, str] = {}
    evaluations = 1
    for role, names in roles.items():
        for cand in candidates:
            if cand == chosen.get(role, best):
                continue
            apply({n: candidates[cand][n] for n in names if n in candidates[cand]})
            s = score()
            evaluations += 1
            if s > current:
                current, chosen[role] = s, cand
            else:
                keep = chosen.get(role, best)
                apply({n: candidates[keep][n] for n in names if n in candidates[keep]})
    return chosen, evaluations
