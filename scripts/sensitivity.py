"""Where INT8 accuracy goes: per-role and per-layer quantizer sensitivity on a fine-tuned model.

Loads a fine-tuned checkpoint (a run's finetuned/ folder), inserts and calibrates quantizers exactly as the
pipeline's calibrate stage does (same config composition), then, in fake quant on the tuning split (never the
eval split), measures the mean KL(FP32 || quantized) of the logits and the accuracy with

- every quantizer on (the PTQ model), every quantizer off except one group ("only"), and every quantizer on
  except one group ("all but"), for each tensor slot: Linear inputs by position (Q/K/V input = LayerNorm
  output, attention output projection input, FFN first Linear input = LayerNorm output, FFN second Linear
  input = GELU output), Linear weights, attention Q/K, P (softmax) and V;
- the FFN second Linear's input quantized in one layer at a time (the rest in FP32);

and the activation ranges behind it: per-input-channel max |x| of every Linear (calibration batches), summed
up as the ratio of the largest channel to the median channel (an outlier measure: a per-tensor INT8 scale is
set by the largest channel). Writes a JSON of every number and a PNG figure.

    python scripts/sensitivity.py --model outputs/base/ft_ptq_percentile/finetuned \\
        --json outputs/base/sensitivity.json --png docs/figures/base_model_sensitivity.png \\
        -- model=mpnet_base_local data.num_train=1500 data.num_calib=512 data.num_eval=800 model.max_length=128

Arguments after `--` are pipeline config overrides (the same as the run's); heavy: run under the shared lock.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline import inference
from pipeline.context import RunContext
from pipeline.inference import kl_per_example
from pipeline.outputs import write_json
from pipeline.quantization import smoothing
from pipeline.quantization.modules import QuantLinear
from pipeline.quantization.slots import layer_of, slot_of
from pipeline.run import run_pipeline
from pipeline.testing import compose_cfg
from pipeline.tune.calibrators import CANDIDATES, apply_amax, candidate_amax, load_histograms
from pipeline.validation import validate


def kl_fp32_to(fp32: np.ndarray, q: np.ndarray) -> float:
    """Mean over examples of KL(softmax(fp32) || softmax(q)) (the tuner's per-example KL)."""
    return float(kl_per_example(fp32, q).mean())


def main(argv: list[str] | None = None) -> int:
    with tempfile.TemporaryDirectory(prefix="sensitivity-") as scratch:  # the run's files go with it
        return _main(argv, Path(scratch))


def _main(argv: list[str] | None, scratch: Path) -> int:
    argv = sys.argv[1:] if argv is None else argv
    overrides = argv[argv.index("--") + 1 :] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", type=Path, default=None, help="fine-tuned checkpoint folder (a run's finetuned/); default: the config's model"
    )
    parser.add_argument("--no-only", dest="only", action="store_false", help="skip the 'only this slot quantized' measurements")
    parser.add_argument("--per-layer", action="store_true", help="also the FFN2 input quantized one layer at a time")
    parser.add_argument("--variants", action="store_true", help="also measure FFN2-input calibration methods and smoothing alphas")
    parser.add_argument(
        "--variants-of",
        nargs="*",
        default=[],
        metavar="SLOT",
        help="also measure these slots' calibration methods and smoothing alphas (slot names as printed, e.g. 'QKV input (LN out)')",
    )
    parser.add_argument(
        "--methods",
        nargs="*",
        default=[m for m in CANDIDATES if m != "percentile_99_99"],
        choices=list(CANDIDATES),
        help="calibration methods tried by --variants / --variants-of (the tuner's candidates)",
    )
    parser.add_argument("--no-slots", dest="slots", action="store_false", help="skip the per-slot only / all-but measurements")
    parser.add_argument("--alphas", type=float, nargs="*", default=[0.5, 0.8], help="smoothing alphas of --variants")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--png", type=Path, required=True)
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    torch.manual_seed(0)
    model = [f"model.name_or_path={args.model.resolve()}", "finetune=none"] if args.model else []
    raw = compose_cfg(
        [*overrides, *model, "qat=none", "benchmark=none", "export=none", "engine=none", "evaluate.enabled=false", "cache=off"]
    )
    cfg = validate(raw)
    # The pipeline itself loads and calibrates (load -> calibrate -> report), exactly as in a run.
    ctx = run_pipeline(raw, scratch / "run")
    tune = ctx.encoded["tune"]
    labels = tune.labels
    bs = cfg.evaluate.batch_size

    def logits(model) -> np.ndarray:
        return inference.torch_logits(model, ctx.tokenizer, tune, bs, ctx.device)

    t0 = time.perf_counter()
    ref = logits(ctx.fp32_model)
    qs = {n: q for n, q in ctx.quantizers.items() if q.enabled}
    slots = {n: slot_of(n, q.role) for n, q in qs.items()}

    def measure(on: set[str]) -> dict:
        for n, q in qs.items():
            q.enabled = n in on
        out = logits(ctx.model)
        for q in qs.values():
            q.enabled = True
        return {"kl": kl_fp32_to(ref, out), "accuracy": inference.accuracy(out, labels)}

    measure.ref = ref  # type: ignore[attr-defined]

    result: dict = {
        "examples": len(labels),
        "split": "tune",
        "calibration": cfg.calibration.method,
        "weight_range": cfg.quant.weight_range,
        "fp32_accuracy": inference.accuracy(ref, labels),
        "all": measure(set(qs)),
        "slots": {},
        "ffn2_input_by_layer": {},
    }
    print(f"fp32 {result['fp32_accuracy']:.4f} | all quantized {result['all']}", flush=True)
    for slot in dict.fromkeys(slots.values()) if args.slots else []:
        members = {n for n, s in slots.items() if s == slot}
        only = measure(members) if args.only else {"kl": float("nan"), "accuracy": float("nan")}
        result["slots"][slot] = {"quantizers": len(members), "only": only, "all_but": measure(set(qs) - members)}
        print(slot, result["slots"][slot], flush=True)
    ffn2 = {n for n, s in slots.items() if s.startswith("FFN2")}
    for n in sorted(ffn2, key=lambda n: layer_of(n) or 0) if args.per_layer else []:
        result["ffn2_input_by_layer"][layer_of(n)] = {"only": measure({n}), "amax": float(qs[n].amax)}
        print("FFN2 input layer", layer_of(n), result["ffn2_input_by_layer"][layer_of(n)], flush=True)

    if args.variants:
        result["ffn2_variants"] = slot_variants(ctx, cfg, qs, ffn2, measure, tuple(args.alphas), "FFN2 input", args.methods)
    for slot in args.variants_of:
        members = {n for n, s in slots.items() if s == slot}
        if not members:
            raise SystemExit(f"--variants-of: no quantizer in slot {slot!r}; slots: {sorted(set(slots.values()))}")
        result.setdefault("slot_variants", {})[slot] = slot_variants(ctx, cfg, qs, members, measure, tuple(args.alphas), slot, args.methods)

    # Activation ranges: per-input-channel max |x| of every quantized Linear over the calibration batches.
    for q in qs.values():
        q.enabled = False
    mods = {n: m for n, m in ctx.model.named_modules() if isinstance(m, QuantLinear)}
    calib = [b.inputs for b in _batches(ctx, cfg)]
    chan = smoothing.input_channel_max(ctx.model, mods, calib)
    ranges = {}
    for n, mx in chan.items():
        ranges[n] = {
            "slot": slot_of(n + ".input_quantizer", "linear_input"),
            "layer": layer_of(n),
            "max": float(mx.max()),
            "median": float(mx.median()),
            "ratio": float(mx.max() / mx.median().clamp(min=1e-8)),
            "amax": float(ctx.quantizers[n + ".input_quantizer"].amax),
            "top_channels": [int(i) for i in torch.topk(mx, 5).indices],
        }
    result["ranges"] = ranges
    worst = max((n for n in chan if ranges[n]["slot"].startswith("FFN2")), key=lambda n: ranges[n]["ratio"])
    result["worst_ffn2"] = {"name": worst, "channel_max": chan[worst].tolist()}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(args.json, result)
    plot(result, args.png)
    print(f"wrote {args.json} and {args.png} ({result['seconds']} s)")
    return 0


def slot_variants(
    ctx: RunContext, cfg, qs: dict, members: set[str], measure, alphas: tuple[float, ...], label: str, methods=tuple(CANDIDATES)
) -> dict:
    """One slot's Linear inputs (`members`: their input quantizer names), other ways, everything else as
    calibrated, on the tuning split: their amax by the tuner's candidate calibrators from the run's own
    calibration histograms, and smoothing (alpha) of those Linears with their inputs and weights
    re-calibrated. For the FFN second Linear: what calibration=percentile_ffn_mse / smoothing=ffn_down do."""
    import copy
    import dataclasses

    from pipeline.quantization.calibrate import METHODS, calibrate_weights

    out: dict = {}
    calib = [b.inputs for b in _batches(ctx, cfg)]
    saved = {n: qs[n].amax.clone() for n in members}

    def collect(model, names):
        """FP32 histograms of `names` in `model` (ctx.model or a smoothed copy): the run's quantizers (qs, by
        name) off during the pass, on again after."""
        mq = dict(model.named_modules())
        for n in qs:
            mq[n].enabled = False
        for n in names:
            mq[n].calibrator.reset()
            mq[n].calibrating = True
        with torch.no_grad():
            for x in calib:
                model(**x)
        for n in names:
            mq[n].calibrating = False
        for n in qs:
            mq[n].enabled = True
        return mq

    hists = {n: h for n, h in load_histograms(ctx.run_dir).items() if n in members}
    for name in methods:
        apply_amax(qs, candidate_amax(name, hists, qs, cfg.calibration), ctx.device)
        out[name] = measure(set(qs))
        print(label, name, out[name], flush=True)
    for n in members:
        qs[n].load_amax(saved[n])
    for alpha in alphas:
        model = copy.deepcopy(ctx.model)
        mq2 = dict(model.named_modules())
        scfg = dataclasses.replace(
            cfg.smoothing, enabled=True, alpha=alpha, modules=sorted(n.removesuffix(".input_quantizer") for n in members)
        )
        mods = smoothing.targets(model, scfg)  # before the quantizers go off: targets() skips Linears whose input is off
        for n in qs:  # smoothing statistics in FP32
            mq2[n].enabled = False
        smoothing.smooth(model, scfg, calib, mods)
        weights = {n.replace(".input_quantizer", ".weight_quantizer") for n in members}
        calibrate_weights({n: mq2[n] for n in weights}, model)
        collect(model, members)
        for n in members:
            mq2[n].load_amax(METHODS[cfg.calibration.method](mq2[n].calibrator, cfg.calibration))
            mq2[n].calibrator.reset()
        logits = inference.torch_logits(model, ctx.tokenizer, ctx.encoded["tune"], cfg.evaluate.batch_size, ctx.device)
        out[f"smoothing alpha {alpha}"] = {
            "kl": kl_fp32_to(measure.ref, logits),
            "accuracy": inference.accuracy(logits, ctx.encoded["tune"].labels),
        }
        print(label, f"smoothing alpha {alpha}", out[f"smoothing alpha {alpha}"], flush=True)
        del model
    return out


def _batches(ctx: RunContext, cfg):
    from pipeline.data import batches

    return batches(ctx.tokenizer, ctx.encoded["calib"], cfg.calibration.batch_size, limit=cfg.calibration.num_batches)


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(14, 11))
    ax = axes[0, 0]
    names = list(r["slots"])
    y = np.arange(len(names))
    only = [r["slots"][s]["only"]["kl"] for s in names]
    allbut = [r["slots"][s]["all_but"]["kl"] for s in names]
    ax.barh(y - 0.2, only, 0.4, label="only this slot INT8 (rest FP32)", color="tab:red")
    ax.barh(y + 0.2, allbut, 0.4, label="all INT8 but this slot", color="tab:blue")
    ax.axvline(r["all"]["kl"], color="k", ls="--", lw=1, label=f"all INT8 (KL {r['all']['kl']:.4f})")
    ax.set_yticks(
        y,
        [
            f"{s}\n"
            + (
                f"only {r['slots'][s]['only']['accuracy'] * 100:.1f}% / "
                if r["slots"][s]["only"]["accuracy"] == r["slots"][s]["only"]["accuracy"]
                else ""
            )
            + f"all-but {r['slots'][s]['all_but']['accuracy'] * 100:.2f}%"
            for s in names
        ],
        fontsize=7,
    )
    ax.set_xscale("symlog", linthresh=1e-4)
    ax.set_xlabel("mean KL(FP32 || fake-quant) of logits, tuning split")
    ax.set_title(
        f"Sensitivity by tensor slot (FP32 {r['fp32_accuracy'] * 100:.1f}%, all INT8 {r['all']['accuracy'] * 100:.1f}%)", fontsize=9
    )
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.12), ncol=3)
    ax = axes[0, 1]
    if r["ffn2_input_by_layer"]:
        layers = sorted(r["ffn2_input_by_layer"], key=int)
        ax.bar([int(x) for x in layers], [r["ffn2_input_by_layer"][x]["only"]["kl"] for x in layers], color="tab:red")
        ax.set_xticks([int(x) for x in layers])
        ax.set(
            xlabel="layer",
            ylabel="KL, only this layer's FFN2 input INT8",
            title="FFN second Linear input (after GELU), one layer at a time",
        )
    elif r.get("ffn2_variants") or r.get("slot_variants"):
        sets = {**({"FFN2 input (GELU out)": r["ffn2_variants"]} if r.get("ffn2_variants") else {}), **r.get("slot_variants", {})}
        v = {f"{r['calibration']} (as calibrated)": r["all"], **{f"{slot}: {n}": x for slot, d in sets.items() for n, x in d.items()}}
        names = list(v)
        ax.barh(np.arange(len(names)), [v[n]["kl"] for n in names], color="tab:purple")
        ax.set_yticks(np.arange(len(names)), [f"{n} ({v[n]['accuracy'] * 100:.2f}%)" for n in names], fontsize=6)
        ax.axvline(r["all"]["kl"], color="k", ls="--", lw=1)
        ax.set(
            xlabel="mean KL(FP32 || fake-quant), all GEMMs INT8, tuning split",
            title="One slot re-calibrated / smoothed, the rest as calibrated",
        )
    ax.title.set_fontsize(9)
    ax = axes[1, 0]
    by_slot: dict[str, list[tuple[int, float]]] = {}
    for v in r["ranges"].values():
        by_slot.setdefault(v["slot"], []).append((v["layer"] or 0, v["ratio"]))
    for slot, pts in sorted(by_slot.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=slot)
    ax.set_yscale("log")
    ax.set(xlabel="layer", ylabel="max channel / median channel of max|x|", title="Outlier channels of Linear inputs (calibration split)")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7)
    ax = axes[1, 1]
    ch = np.asarray(r["worst_ffn2"]["channel_max"])
    ax.plot(np.sort(ch)[::-1], color="tab:red")
    ax.set_yscale("log")
    ax.set(xlabel="input channel (sorted)", ylabel="max |x| over calibration tokens", title=f"{r['worst_ffn2']['name']}: per-channel range")
    ax.title.set_fontsize(8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
