"""report.md section of the accuracy budget: the plan chosen, the budget, the tuning-split and eval results."""

from __future__ import annotations

from pipeline.tune.auto import target_text


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f} %"


def _ratio(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


def report_lines(d: dict) -> list[str]:
    t = d["tune"]
    unit = "pt" if t["drop_type"] == "absolute" else "% of FP32"
    acc = d["accuracy"]
    base = (d.get("engine_precisions") or {}).get("baseline") or "fp32"
    lines = ["## Accuracy budget (tune)", ""]
    if t.get("steps"):
        lines += _auto_lines(t, unit)
    if t.get("plan"):
        lines.append(f"- plan applied from `{t['plan']}` (no search)")
    lines += [
        f"- budget: drop ≤ {t['max_drop']} {unit} on the tuning split ({t['tune_examples']} examples): "
        f"**{'met' if t['met'] else 'NOT met — the most accurate plan found is kept'}**",
        f"- calibrator: {t['calibrator']} (run's own: {t.get('start_calibrator')})"
        + (
            f"; then {len(t['calibration_rules'])} rules (tune.calibrator_per): " + "; ".join(map(_rule, t["calibration_rules"]))
            if t.get("calibration_rules")
            else ""
        ),  # fmt: skip
        f"- fusion groups in float: {len(t['groups_in_float'])}"
        + (f" of {t['fusion_groups']}" if t.get("fusion_groups") else "")
        + (
            f" ({t['quantizers_in_float']} quantizers): " + ", ".join(f"`{g}`" for g in t["groups_in_float"])
            if t["groups_in_float"]
            else ""
        ),
        f"- tuning split: FP32 {_pct(t['fp32_tune_accuracy'])}, tuned fake-quant {_pct(t['tune_accuracy'])} (drop {t['drop']:.2f}{_ci(t)} {unit})"
        + (f"; before the fallback {_pct(t['start']['accuracy'])} (drop {t['start']['drop']:.2f} {unit})" if t.get("start") else ""),
        f"- {t['evaluations']} full tuning-split evaluations, {t['seconds']} s"
        + (f"; stopped: {t['stopped']}" if t.get("stopped") else ""),
    ]
    if t.get("start"):
        note = f" ({t['latency_note']})" if t.get("latency_note") else ""
        lines.append(
            f"- INT8/{base.upper()} latency ratio during the search (same run, interleaved): before {_ratio(t['start']['latency_ratio'])}, "
            f"chosen plan {_ratio(t['latency_ratio'])}{note}"
        )
    if acc.get("fp32") is not None:
        q = acc.get("int8") if acc.get("int8") is not None else acc.get("fake_quant")
        which = "INT8 engine" if acc.get("int8") is not None else "fake quant"
        drop = "" if q is None else f", drop {100 * (acc['fp32'] - q):.2f} pt"
        lines.append(f"- eval split (reported only, never used to decide): FP32 {_pct(acc['fp32'])}, {which} {_pct(q)}{drop}")
    scores = t.get("calibrator_scores") or {}
    if scores:
        crit = {"kl": "lowest KL to FP32", "accuracy": "highest tuning accuracy"}.get(t.get("criterion", ""), "")
        lines += ["", f"Calibrator chosen by {crit or 'the tuning score'} (`tune.criterion`), on the tuning split:", ""]
        lines += ["| calibrator | tuning accuracy | KL to FP32 |", "|---|---|---|"]
        lines += [
            f"| {n}{' (chosen)' if n == t['calibrator'] else ''} | {_pct(s['accuracy'])} | {s['kl']:.5f} |" for n, s in scores.items()
        ]
    lines.append("")
    figs = [f for f in ("sensitivity.png", "tune_trace.png") if t.get("start")]
    lines += [f"![{f[:-4]}]({f})" for f in figs] + ([""] if figs else [])
    lines += [
        "Files: `tune_trace.csv`, `sensitivity.csv`, `tuned_quant.yaml` (reuse: the same command + `tune.plan=<this run>/tuned_quant.yaml`).",
        "",
    ]
    return lines


_BASIS = {
    "labels": "labelled drop and its paired interval",
    "fp32_expected": "the point and FP32-expected drops (labels cannot resolve the budget)",
    "point": "the score's point drop (no per-example interval)",
    "targets": "the task's fidelity targets",
}


def _auto_lines(t: dict, unit: str) -> list[str]:
    """tune=auto: each step taken, what the budget check said after it, its cost, and why it stopped."""
    last = t["steps"][-1]
    lines = [
        f"Adaptive recipe (`tune=auto`): **{'met' if t['met'] else 'not met'} after {last['step']}** — {last['why']}. "
        f"Judged on {_BASIS.get(last['basis'], last['basis'])}; {t.get('resolution', '')}.",
        "",
        f"| step | budget | basis | tuning score | drop ({unit}) | FP32-expected drop | KL to FP32 | seconds | what it did |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in t["steps"]:
        ci = f" ± {s['drop_ci95']:.2f}" if s.get("drop_ci95") is not None else ""
        exp = "—" if s.get("expected_drop") is None else f"{s['expected_drop']:.3f}"
        tg = "; ".join(f"{target_text(n, v)} (min {v['minimum']})" for n, v in (s.get("targets") or {}).items())
        lines.append(
            f"| {s['step']} | {'met' if s['met'] else 'not met'} | {s['basis']} | {_pct(s['tune_accuracy'])} | {s['drop']:.2f}{ci} | {exp} | "
            f"{s['kl']:.5f} | {s['seconds']} | {s.get('note', '')}{'; ' + tg if tg else ''} |"
        )
    lines += [
        "",
        f"Stopped: {t.get('stopped')}. Steps not listed were not needed (or not available: `qat=none`, `tune.fallback=false`).",
        "",
    ]
    return lines


def _ci(t: dict) -> str:
    """' ± x' (95 % interval of the tuning drop, paired) where recorded."""
    ci = t.get("drop_ci95")
    return f" ± {ci:.2f}" if isinstance(ci, int | float) and ci == ci and ci != float("inf") else ""


def _rule(r: dict) -> str:
    """One quant.rules method rule, short: `glob`, ... (roles) -> method [percentile]."""
    where = ", ".join(f"`{g}`" for g in r.get("name") or []) or "any name"
    roles = f" ({', '.join(r['roles'])})" if r.get("roles") else ""
    pct = f" {r['percentile']}" if r.get("percentile") is not None else ""
    return f"{where}{roles} → {r['method']}{pct}"
