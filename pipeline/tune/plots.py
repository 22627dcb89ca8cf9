"""sensitivity.png (proxy score per fusion group) and tune_trace.png (the accuracy/latency curve)."""

from __future__ import annotations

from pathlib import Path

from pipeline.outputs import atomic_write
from pipeline.tune.search import TraceRow
from pipeline.tune.sensitivity import Sensitivity

KIND_COLORS = {"linear": "tab:blue", "attn_qk": "tab:orange", "attn_pv": "tab:green", "attn_rel": "tab:olive", "residual": "tab:red"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def short(name: str) -> str:
    """bert.encoder.layer.3.attention.self:qk -> L3 attention.self:qk"""
    parts = name.split(".")
    if "layer" in parts:
        i = parts.index("layer")
        if i + 1 < len(parts):
            return f"L{parts[i + 1]} " + ".".join(parts[i + 2 :])
    return name


def sensitivity_png(ranked: list[Sensitivity], path: Path, top: int = 30) -> Path:
    plt = _plt()
    rows = ranked[:top]
    fig, ax = plt.subplots(figsize=(8, 0.28 * len(rows) + 1.6))
    y = range(len(rows))[::-1]
    ax.barh(list(y), [s.score for s in rows], color=[KIND_COLORS.get(s.group.kind, "tab:gray") for s in rows])
    ax.set_yticks(list(y), [short(s.group.name) for s in rows], fontsize=7)
    for yi, s in zip(y, rows):
        if s.accuracy_effect is not None:
            ax.annotate(
                f"{s.accuracy_effect:+.2f} pt", (max(s.score, 0), yi), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7
            )
    from matplotlib.patches import Patch

    handles = [Patch(color=c, label=k) for k, c in KIND_COLORS.items() if any(s.group.kind == k for s in rows)]
    ax.axvline(0, color="black", lw=0.6)
    n = len(ranked)
    ax.set(
        xlabel="proxy: KL(all INT8) - KL(group in float) on the hardest tuning examples",
        title=f"Fusion-group sensitivity (top {len(rows)} of {n}; labels: tuning accuracy effect where tried)",
    )
    ax.title.set_fontsize(9)
    ax.legend(handles=handles, fontsize=7, loc="lower right")
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)
    return path


def trace_png(trace: list[TraceRow], chosen: TraceRow, budget_accuracy: float, fp32_accuracy: float, path: Path) -> Path:
    """Left: tuning accuracy vs quantized/baseline latency ratio of every accepted state (step labels);
    without latency (not measured), accuracy vs step. Right: the decision measure, the tuning KL to
    FP32, at every step (accepted and stepped back): the accuracy moves in 1-example steps while the
    KL of the accepted states falls steadily."""
    plt = _plt()
    fig, (ax, kx) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    states = [r for r in trace if r.accepted]
    kx.plot([r.step for r in states], [r.kl for r in states], "o-", color="tab:blue", lw=1, ms=4, label="accepted")
    rej = [r for r in trace if not r.accepted]
    if rej:
        kx.plot([r.step for r in rej], [r.kl for r in rej], "x", color="tab:gray", label="stepped back / not kept")
    kx.plot([chosen.step], [chosen.kl], "*", ms=14, color="tab:red", label="chosen plan")
    kx.set(xlabel="search step", ylabel="mean KL(FP32 || quantized), tuning split", title="Decision measure by step")
    kx.title.set_fontsize(9)
    kx.legend(fontsize=7)
    kx.grid(alpha=0.3)
    timed = [r for r in states if r.latency_ratio is not None]
    if timed:
        pts, xs, xlabel = timed, [r.latency_ratio for r in timed], "INT8 / baseline p50 latency (same run, headline shape)"
    else:
        pts, xs, xlabel = states, [r.step for r in states], "search step (latency not measured)"
        rejected = [r for r in trace if not r.accepted]
        if rejected:
            ax.plot([r.step for r in rejected], [100 * r.accuracy for r in rejected], "x", color="tab:gray", label="stepped back")
    ax.plot(xs, [100 * r.accuracy for r in pts], "o-", color="tab:blue", lw=1, ms=4, label="accepted states")
    for x, r in zip(xs, pts):
        ax.annotate(f"{r.step}:{len(r.groups_in_float)}", (x, 100 * r.accuracy), xytext=(3, 3), textcoords="offset points", fontsize=7)
    cx = chosen.latency_ratio if timed and chosen.latency_ratio is not None else (chosen.step if not timed else None)
    if cx is not None:
        ax.plot([cx], [100 * chosen.accuracy], "*", ms=14, color="tab:red", label="chosen plan")
    ax.axhline(100 * fp32_accuracy, color="black", lw=0.8, ls="--", label="FP32 (tuning split)")
    ax.axhline(100 * budget_accuracy, color="tab:red", lw=0.8, ls=":", label="budget")
    ax.set(
        xlabel=xlabel, ylabel="fake-quant accuracy on the tuning split (%)", title="Accuracy budget search (labels: step:groups in float)"
    )
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)
    return path
