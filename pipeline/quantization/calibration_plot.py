"""calibration.png: where every calibration method would put amax on this run's own activation histograms.

The histograms are the ones the calibration pass already collected (no second pass): `histograms()`
copies them out of the calibrators just before the chosen method turns them into amax and frees them.
The calibrate stage writes them to `calibration_histograms.safetensors` in the run folder *and* in its
stage-cache entry, so a cached calibrate stage restores them with the amax values; the report stage
draws `calibration.png` from the run folder.

Only per-tensor activation quantizers collect histograms, and only when a histogram method
(percentile, entropy, mse) was chosen: `calibration=max` keeps a running maximum and nothing else, so
there is no distribution to draw; calibration.png then shows each activation quantizer's amax (from
quant_map.json) and says so. Weights are per-channel max (no histogram) in every mode.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.quantization import calibrate
from pipeline.quantization.calibrators import HistogramCalibrator
from pipeline.quantization.tensor_quantizer import TensorQuantizer

HISTOGRAMS = "calibration_histograms.safetensors"
FIGURE = "calibration.png"
METHODS = tuple(calibrate.METHODS)  # the figure draws every registered method
COLORS = {"max": "tab:red", "percentile": "tab:blue", "entropy": "tab:green", "mse": "tab:purple"}


def histograms(quantizers: dict[str, TensorQuantizer]) -> dict[str, torch.Tensor]:
    """The collected |x| histograms of every histogram-calibrated quantizer: `<name>.hist`, `<name>.edges`.

    Called between collection and compute_amax (the calibrator frees its histogram after that).
    """
    out: dict[str, torch.Tensor] = {}
    for name, q in quantizers.items():
        c = q.calibrator
        # The calibrator's own state, read in place (pytorch-quantization's attribute names).
        if isinstance(c, HistogramCalibrator) and c._calib_hist is not None:
            out[f"{name}.hist"] = c._calib_hist.detach().float().cpu().contiguous()
            out[f"{name}.edges"] = c._calib_bin_edges.detach().float().cpu().contiguous()
    return out


@dataclass
class Histogram:
    """One quantizer's calibration histogram (counts of |x| per bin) and every method's amax on it."""

    name: str
    role: str
    counts: np.ndarray  # (bins,)
    edges: np.ndarray  # (bins + 1,), from 0
    num_bits: int = 8
    unsigned: bool = False
    amax: dict[str, float] = field(default_factory=dict)

    @property
    def centers(self) -> np.ndarray:
        return (self.edges[:-1] + self.edges[1:]) / 2

    @property
    def disagreement(self) -> float:
        """Largest / smallest amax over the methods (1 = they all agree)."""
        v = [a for a in self.amax.values() if a > 0]
        return max(v) / min(v) if v else 1.0

    def error(self, amax: float) -> dict[str, float]:
        """Quantization error of this distribution at `amax` (bin centers stand in for the values).

        Returns mse, sqnr_db (10 log10 E[x^2] / mse) and clipped (fraction of values above amax).
        """
        x, c = self.centers, self.counts.astype(np.float64)
        qmax = 2**self.num_bits - 1 if self.unsigned else 2 ** (self.num_bits - 1) - 1
        scale = amax / qmax
        q = np.clip(np.round(x / scale), 0, qmax) * scale
        n = c.sum()
        mse = float((c * (x - q) ** 2).sum() / n)
        power = float((c * x**2).sum() / n)
        return {
            "mse": mse,
            "sqnr_db": 10 * math.log10(power / mse) if mse > 0 else float("inf"),
            "clipped": float(c[x > amax].sum() / n),
        }


def method_amax(
    counts: np.ndarray, edges: np.ndarray, num_bits: int, unsigned: bool, *, percentile: float, stride: int, start_bin: int
) -> dict:
    """amax of every method on one histogram, computed by the project's calibrators (the same code as a real run)."""
    cal = HistogramCalibrator(num_bits, None, unsigned)
    cal._calib_hist = torch.as_tensor(counts, dtype=torch.float32)
    cal._calib_bin_edges = torch.as_tensor(edges, dtype=torch.float32)
    nonzero = np.nonzero(counts)[0]
    out = {"max": float(edges[nonzero[-1] + 1]) if len(nonzero) else 0.0}  # upper edge of the last non-empty bin
    out["percentile"] = float(cal.compute_amax("percentile", percentile=percentile))
    for m in ("entropy", "mse"):
        out[m] = float(cal.compute_amax(m, stride=stride, start_bin=start_bin))
    return out


def load(run_dir: Path, calibration: dict | None = None) -> list[Histogram]:
    """Every histogram of a run with each method's amax (settings from `calibration`, default the run's config)."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    path = run_dir / HISTOGRAMS
    if not path.exists():
        return []
    calibration = calibration or _run_calibration(run_dir)
    info = {r["name"]: r for r in json.loads((run_dir / "quant_map.json").read_text())} if (run_dir / "quant_map.json").exists() else {}
    state = load_file(str(path))
    out = []
    for key in sorted(state):
        if not key.endswith(".hist"):
            continue
        name = key[: -len(".hist")]
        r = info.get(name, {})
        h = Histogram(
            name, r.get("role", "?"), state[key].numpy(), state[f"{name}.edges"].numpy(), int(r.get("num_bits", 8)), bool(r.get("unsigned"))
        )
        h.amax = method_amax(
            h.counts,
            h.edges,
            h.num_bits,
            h.unsigned,
            percentile=float(calibration.get("percentile", 99.99)),
            stride=int(calibration.get("stride", 1)),
            start_bin=int(calibration.get("start_bin", 128)),
        )
        out.append(h)
    return out


def _run_calibration(run_dir: Path) -> dict:
    path = run_dir / "config.resolved.yaml"
    if not path.exists():
        return {}
    import yaml

    return (yaml.safe_load(path.read_text()) or {}).get("calibration", {}) or {}


def short(name: str) -> str:
    """bert.encoder.layer.3.intermediate.dense.input_quantizer -> layer.3.intermediate.dense.input"""
    for prefix in ("bert.encoder.", "roberta.encoder.", "encoder.", "model."):
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    return name.replace("_quantizer", "")


def draw_histogram(ax, h: Histogram, chosen: str | None, methods: tuple[str, ...] = METHODS, *, say_chosen: bool = True) -> None:
    """Log-scale histogram of |x| with each method's amax (the chosen one thick) on one matplotlib axis."""
    ax.fill_between(h.centers, h.counts, step="mid", color="0.6", linewidth=0)
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.8)
    for m in methods:
        a = h.amax[m]
        e = h.error(a)
        is_chosen = m == chosen
        ax.axvline(
            a,
            color=COLORS[m],
            linewidth=2.6 if is_chosen else 1.1,
            linestyle="-" if is_chosen else "--",
            label=f"{m}{' (chosen)' if is_chosen and say_chosen else ''}: {a:.3g}, clips {100 * e['clipped']:.3g} %, SQNR {e['sqnr_db']:.1f} dB",
        )
    ax.set_xlabel("|x|")
    ax.set_ylabel("count (log)")


def plot(run_dir: Path, chosen: str, *, top: int = 4, out: Path | None = None) -> tuple[Path | None, str]:
    """Draw calibration.png for a run; returns (path or None, a sentence saying what it shows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    out = Path(out or run_dir / FIGURE)
    hists = load(run_dir)
    if hists:
        pick = sorted(hists, key=lambda h: h.disagreement, reverse=True)[:top]
        cols = 2 if len(pick) > 1 else 1
        rows = math.ceil(len(pick) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 3.6 * rows), squeeze=False)
        for ax, h in zip(axes.flat, pick):
            draw_histogram(ax, h, chosen)
            ax.set_title(f"{short(h.name)} ({h.role}) — methods differ {h.disagreement:.1f}×", fontsize=9)
            ax.legend(fontsize=7, loc="upper right")
        for ax in list(axes.flat)[len(pick) :]:
            ax.axis("off")
        fig.suptitle(f"calibration={chosen}: the {len(pick)} activation quantizers whose methods disagree most ({len(hists)} histograms)")
        fig.tight_layout()
        _save(fig, out)
        plt.close(fig)
        return out, (
            f"The {len(pick)} activation quantizers (of {len(hists)} with a histogram) whose calibration methods disagree most: "
            f"|x| histogram of the calibration pass (log scale), each method's amax with the share of values it clips and the "
            f"resulting SQNR; the chosen method ({chosen}) is the thick line."
        )
    qmap = run_dir / "quant_map.json"
    if not qmap.exists():
        return None, "No calibration in this run (calibration=none or the calibrate stage did not run): no calibration.png."
    rows_ = [r for r in json.loads(qmap.read_text()) if r["role"] != "linear_weight" and isinstance(r["amax"], float)]
    if not rows_:
        return None, "No calibrated activation quantizer in this run: no calibration.png."
    rows_.sort(key=lambda r: r["amax"])
    roles = sorted({r["role"] for r in rows_})
    palette = dict(zip(roles, plt.get_cmap("tab10").colors))
    fig, ax = plt.subplots(figsize=(10, 3.8))
    ax.bar(range(len(rows_)), [r["amax"] for r in rows_], color=[palette[r["role"]] for r in rows_])
    ax.set_yscale("log")
    ax.set_xticks([])
    ax.set_xlabel(f"{len(rows_)} activation quantizers, sorted by amax")
    ax.set_ylabel("amax (log)")
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=palette[r]) for r in roles], labels=roles, fontsize=7)
    ax.set_title(f"calibration={chosen}: no histograms collected (the max calibrator keeps only a running maximum); amax per quantizer")
    fig.tight_layout()
    _save(fig, out)
    plt.close(fig)
    return out, (
        f"calibration={chosen} collects no histograms (only each activation's running maximum), so there is no "
        "distribution to compare methods on; the figure shows the amax of every activation quantizer by role. "
        "Choose calibration=percentile, entropy or mse to see every method on the same histograms."
    )


def _save(fig, out: Path) -> None:
    from pipeline.outputs import atomic_write

    atomic_write(out, lambda p: fig.savefig(p, dpi=90, format="png"))


def report_lines(run_dir: Path, chosen: str) -> list[str]:
    """The report.md section: calibration.png and what it shows (or why there is none)."""
    path, what = plot(run_dir, chosen)
    lines = ["## Calibration", "", what, ""]
    if path is not None:
        lines += [f"![calibration]({path.name})", ""]
    return lines
