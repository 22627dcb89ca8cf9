"""Quantization noise of every activation quantizer of a run, from its own calibration histograms (no forward pass).

A run's `calibration_histograms.safetensors` holds the |x| histogram each activation quantizer collected on the
calibration split, and `quant_map.json` the amax it got. For each quantizer this computes, from the histogram:

- the range: max |x| and max / amax (how far the calibrated range clips the tail);
- the SQNR in dB at that amax: signal sum(x^2) over noise = rounding (step^2 / 12 for values inside the range,
  step = amax / 127, / 255 for unsigned P, the grid's own scale for an asymmetric input) + clipping ((x - amax)^2 beyond it);

grouped by tensor slot (pipeline/quantization/slots.py, as scripts/sensitivity.py) and layer, as a JSON and a figure.

    python scripts/activation_ranges.py outputs/base/ft_ptq_percentile \\
        --json outputs/base/activation_ranges.json --png docs/figures/base_model_activation_ranges.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from pipeline.quantization.slots import layer_of, slot_of


def sqnr_db(hist: np.ndarray, edges: np.ndarray, amax: float, step: float) -> float:
    centers = (edges[:-1] + edges[1:]) / 2
    signal = float((hist * centers**2).sum())
    inside = centers <= amax
    noise = float(hist[inside].sum() * step**2 / 12 + (hist[~inside] * (centers[~inside] - amax) ** 2).sum())
    return 10 * np.log10(signal / max(noise, 1e-30))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a run folder (calibration_histograms.safetensors + quant_map.json)")
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--png", type=Path, required=True)
    args = p.parse_args(argv)
    hists = load_file(str(args.run / "calibration_histograms.safetensors"))
    qmap = {q["name"]: q for q in json.loads((args.run / "quant_map.json").read_text())}
    rows = []
    for name, q in qmap.items():
        if f"{name}.hist" not in hists or not isinstance(q["amax"], float):
            continue
        h, e = hists[f"{name}.hist"].astype(np.float64), hists[f"{name}.edges"].astype(np.float64)
        nz = np.nonzero(h)[0]
        xmax = float(e[nz[-1] + 1]) if nz.size else 0.0
        # the grid's step: amax/127 (signed), amax/255 (unsigned P), or the asymmetric grid's own scale
        step = q["scale"] if q.get("asymmetric") else q["amax"] / (255 if q["unsigned"] else 127)
        rows.append(
            {
                "name": name,
                "slot": slot_of(name, q["role"]),
                "layer": layer_of(name),
                "amax": q["amax"],
                "max": xmax,
                "max_over_amax": xmax / q["amax"],
                "sqnr_db": sqnr_db(h, e, q["amax"], step),
            }
        )
    by_slot: dict[str, list[dict]] = {}
    for r in rows:
        by_slot.setdefault(r["slot"], []).append(r)
    summary = {
        s: {
            "quantizers": len(v),
            "sqnr_db_mean": float(np.mean([r["sqnr_db"] for r in v])),
            "sqnr_db_min": float(min(r["sqnr_db"] for r in v)),
        }
        for s, v in by_slot.items()
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"run": str(args.run), "summary": summary, "quantizers": rows}, indent=1))
    for s, v in sorted(summary.items(), key=lambda kv: kv[1]["sqnr_db_mean"]):
        print(f"{s:28s} n={v['quantizers']:3d}  SQNR mean {v['sqnr_db_mean']:6.2f} dB  min {v['sqnr_db_min']:6.2f} dB")
    plot(by_slot, args.png, args.run)
    return 0


def plot(by_slot: dict[str, list[dict]], path: Path, run: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.6))
    for slot, v in sorted(by_slot.items()):
        v = sorted(v, key=lambda r: r["layer"] or 0)
        # Several quantizers per layer (Q/K/V inputs, Q and K): markers only, a line would zigzag.
        ls = "-" if len({r["layer"] for r in v}) == len(v) else "none"
        a.plot([r["layer"] for r in v], [r["sqnr_db"] for r in v], marker="o", ms=3, ls=ls, label=slot)
        b.plot([r["layer"] for r in v], [r["max_over_amax"] for r in v], marker="o", ms=3, ls=ls, label=slot)
    a.set(
        xlabel="layer", ylabel="SQNR at the calibrated amax (dB)", title="Quantization noise per activation quantizer (calibration split)"
    )
    b.set(xlabel="layer", ylabel="max |x| / amax", title="How far the calibrated range clips the tail")
    b.set_yscale("log")
    for ax in (a, b):
        ax.title.set_fontsize(9)
        ax.set_xticks(range(0, 1 + max((r["layer"] or 0) for v in by_slot.values() for r in v)))
    a.legend(fontsize=7)
    fig.suptitle(f"{run}", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
