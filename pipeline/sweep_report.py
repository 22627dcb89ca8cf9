"""Aggregate a multirun: every job's metrics.json / manifest.json into sweep_summary.csv,
sweep_report.md and a Pareto plot (quantized accuracy vs latency, baseline marked, front highlighted).

Runs at the end of a multirun (Hydra callback `SweepReport`) and on demand:
    qdq-pipeline-report outputs/<run_name>/multirun_<time>
Failed jobs are rows with status `failed` and their error; partial sweeps report what exists.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

import yaml

from pipeline.outputs import atomic_write, write_text

COLUMNS = [
    "job",
    "status",
    "overrides",
    "baseline",
    "quantized",
    "acc_fp32",
    "acc_fake_quant",
    "acc_engine_baseline",
    "acc_quantized",
    "delta_quantized_fp32",
    "parity_argmax",
    "parity_cosine",
    "p50_baseline_ms",
    "p50_quantized_ms",
    "speedup",
    "cached_stages",
    "seconds",
    "error",
    "peers",
    # What the run returned to a sweeper (objective.json; pipeline/objective.py): the value Optuna saw,
    # and for objective.metric=latency whether the accuracy floor was met.
    "objective",
    "feasible",
    # Accuracy budget (tune=accuracy): "met|not met, drop <unit>, <calibrator>, <n> groups in float".
    "tune",
    # What the model is for (conf/task/), and the task's own metrics of the quantized engine against FP32
    # (metrics.json under the task's name, e.g. embedding: cosine_mean=0.99 recall_at_10=0.93 knn_accuracy=0.80).
    "task",
    "task_metrics",
]


def _job_row(job: Path) -> dict | None:
    manifest_path = job / "manifest.json"
    overrides_path = job / ".hydra" / "overrides.yaml"
    if not manifest_path.exists() and not overrides_path.exists():
        return None
    overrides = yaml.safe_load(overrides_path.read_text()) if overrides_path.exists() else []
    row = {c: None for c in COLUMNS}
    row.update(job=job.name, overrides=" ".join(overrides or []))
    man = (
        json.loads(manifest_path.read_text())
        if manifest_path.exists()
        else {"status": "failed", "error": "no manifest (job never started)"}
    )
    row["status"], row["error"] = man.get("status"), man.get("error")
    stages = man.get("stages", {})
    row["cached_stages"] = " ".join(k for k, v in stages.items() if v.get("status") == "cached")
    row["seconds"] = round(sum(v.get("seconds", 0) for v in stages.values()), 1)
    if (job / "objective.json").exists():
        obj = json.loads((job / "objective.json").read_text())
        row.update(objective=obj.get("value"), feasible=obj.get("feasible"))
    metrics_path = job / "metrics.json"
    if metrics_path.exists():
        m = json.loads(metrics_path.read_text())
        acc, par, lat = m.get("accuracy", {}), m.get("parity", {}), m.get("latency_ms", {})
        # The engine's baseline is FP32 on ONNX Runtime and FP16 on TensorRT; the quantized engine is
        # INT8 or FP8 (quant.format): columns name the role, the labels say which precision it was.
        prec = m.get("engine_precisions") or {}
        base, quant = prec.get("baseline") or "fp32", prec.get("quantized") or "int8"
        row.update(
            baseline=base,
            quantized=quant,
            acc_fp32=acc.get("fp32"),
            acc_fake_quant=acc.get("fake_quant"),
            acc_engine_baseline=acc.get(f"engine_{base}"),
            acc_quantized=acc.get(quant),
            parity_argmax=par.get("argmax_agreement"),
            parity_cosine=par.get("cosine"),
            p50_baseline_ms=lat.get(base, {}).get("p50"),
            p50_quantized_ms=lat.get(quant, {}).get("p50"),
            speedup=m.get("speedup"),
        )
        if row["acc_quantized"] is not None and row["acc_fp32"] is not None:
            row["delta_quantized_fp32"] = row["acc_quantized"] - row["acc_fp32"]
        # ONNX Runtime's own quantizers in this job (benchmark.peers): name=accuracy@p50 at the headline shape.
        head = (m.get("benchmark", {}).get("headline_batch"), m.get("benchmark", {}).get("headline_seq"))
        row["peers"] = " ".join(_peer_cell(p, head) for p in m.get("peers", [])) or None
        row["task"] = m.get("task")
        own = m.get(row["task"]) if isinstance(m.get(row["task"]), dict) else {}
        if isinstance(own.get(quant), dict):
            row["task_metrics"] = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in own[quant].items())
        t = m.get("tune")
        if t:
            unit = "pt" if t.get("drop_type") == "absolute" else "%"
            row["tune"] = (
                f"{'met' if t['met'] else 'not met'} (max {t['max_drop']} {unit}), drop {t.get('drop', 0):.2f} {unit}, "
                f"{t['calibrator']}, {len(t['groups_in_float'])} groups in float"
            )
    return row


def _peer_cell(peer: dict, head: tuple) -> str:
    if peer.get("error"):
        return f"{peer['name']}=failed"
    p50 = next((r["p50"] for r in peer.get("grid", []) if (r["batch"], r["seq"]) == head), None)
    acc = "—" if peer.get("accuracy") is None else f"{100 * peer['accuracy']:.2f}%"
    return f"{peer['name']}={acc}@{'—' if p50 is None else f'{p50:.2f}ms'}"


def collect(sweep_dir: Path) -> list[dict]:
    jobs = sorted((p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: (len(p.name), p.name))
    rows = [r for r in (_job_row(j) for j in jobs) if r is not None]
    # Best quantized-engine accuracy first; failed / incomplete jobs last.
    return sorted(rows, key=lambda r: (r["status"] != "done", -(r["acc_quantized"] or -1.0)))


def pareto_front(rows: list[dict]) -> list[dict]:
    """Rows not dominated in (higher quantized-engine accuracy, lower quantized-engine p50 latency)."""
    pts = [r for r in rows if r["acc_quantized"] is not None and r["p50_quantized_ms"] is not None]
    return [
        r
        for r in pts
        if not any(
            o["acc_quantized"] >= r["acc_quantized"]
            and o["p50_quantized_ms"] <= r["p50_quantized_ms"]
            and (o["acc_quantized"], o["p50_quantized_ms"]) != (r["acc_quantized"], r["p50_quantized_ms"])
            for o in pts
        )
    ]


def _common_overrides(rows: list[dict]) -> list[str]:
    sets = [r["overrides"].split() for r in rows]
    return [o for o in sets[0] if all(o in s for s in sets[1:])] if sets else []


def _fmt(v, pct: bool = False) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{100 * v:.2f}" if pct else f"{v:.3f}"
    return str(v)


def write_report(sweep_dir: Path) -> list[dict]:
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS)
    w.writeheader()
    w.writerows(rows)
    write_text(sweep_dir / "sweep_summary.csv", buf.getvalue())
    front = {r["job"] for r in pareto_front(rows)}
    done = sum(r["status"] == "done" for r in rows)
    common = _common_overrides(rows)
    lines = [
        f"# Sweep report: {sweep_dir}",
        "",
        f"{len(rows)} jobs: {done} done, {len(rows) - done} failed or incomplete. "
        "Sorted by quantized-engine accuracy; * = on the accuracy/latency Pareto front.",
        "",
        f"Overrides shared by every job: `{' '.join(common) or '(none)'}`; the table shows each job's own.",
        "",
        "| job | status | overrides | FP32 % | fake-quant % | quantized engine % | Δ vs FP32 (pt) | p50 baseline ms | p50 quantized ms | speedup | cached stages |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        star = "*" if r["job"] in front else ""
        delta = "—" if r["delta_quantized_fp32"] is None else f"{100 * r['delta_quantized_fp32']:+.2f}"
        own = " ".join(o for o in r["overrides"].split() if o not in common)
        lines.append(
            f"| {r['job']}{star} | {r['status']} | `{own}` | {_fmt(r['acc_fp32'], True)} | {_fmt(r['acc_fake_quant'], True)} | "
            f"{_fmt(r['acc_quantized'], True)} ({r['quantized']}) | {delta} | {_fmt(r['p50_baseline_ms'])} ({r['baseline']}) | {_fmt(r['p50_quantized_ms'])} | {_fmt(r['speedup'])} | {r['cached_stages'] or '—'} |"
        )
    with_peers = [r for r in rows if r["peers"]]
    if with_peers:
        lines += ["", "## Peers (ONNX Runtime's own quantizers in each job: accuracy @ p50 at the headline shape)", ""]
        lines += [f"- {r['job']}: {r['peers']}" for r in with_peers]
    with_task = [r for r in rows if r["task_metrics"]]
    if with_task:
        lines += ["", "## Task metrics (quantized engine against FP32 torch, the task's own terms)", ""]
        lines += [f"- {r['job']} ({r['task']}): {r['task_metrics']}" for r in with_task]
    tuned = [r for r in rows if r["tune"]]
    if tuned:
        lines += ["", "## Accuracy budget (tune): drop on the tuning split, chosen calibrator, fusion groups in float", ""]
        lines += [f"- {r['job']}: {r['tune']}" for r in tuned]
    floor = [r for r in rows if r["feasible"] is False]
    if floor:  # objective.metric=latency: trials under the accuracy floor (their objective is a penalty)
        lines += [
            "",
            f"Under the accuracy floor (objective.min_accuracy; infeasible in a latency search): jobs {', '.join(r['job'] for r in floor)}.",
        ]
    failed = [r for r in rows if r["status"] != "done"]
    if failed:
        lines += ["", "## Failed jobs", ""] + [f"- job {r['job']} (`{r['overrides']}`): {r['error']}" for r in failed]
    if _plot(rows, sweep_dir / "pareto.png"):
        lines += ["", "![pareto](pareto.png)"]
    write_text(sweep_dir / "sweep_report.md", "\n".join(lines) + "\n")
    return rows


def _plot(rows: list[dict], path: Path) -> bool:
    pts = [r for r in rows if r["acc_quantized"] is not None and r["p50_quantized_ms"] is not None]
    if not pts:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    front = sorted(pareto_front(rows), key=lambda r: r["p50_quantized_ms"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter(
        [r["p50_quantized_ms"] for r in pts],
        [100 * r["acc_quantized"] for r in pts],
        c="tab:blue",
        label="quantized engine (INT8 / FP8)",
        zorder=3,
    )
    ax.plot(
        [r["p50_quantized_ms"] for r in front], [100 * r["acc_quantized"] for r in front], "-o", c="tab:red", label="Pareto front", zorder=4
    )
    common = _common_overrides(rows)
    for r in pts:
        own = " ".join(o for o in r["overrides"].split() if o not in common)
        ax.annotate(
            own[:40] or r["job"], (r["p50_quantized_ms"], 100 * r["acc_quantized"]), fontsize=6, xytext=(3, 3), textcoords="offset points"
        )
    fp32 = [r for r in pts if r["acc_fp32"] is not None and r["p50_baseline_ms"] is not None]
    if fp32:
        ax.scatter(
            [r["p50_baseline_ms"] for r in fp32],
            [100 * r["acc_fp32"] for r in fp32],
            marker="s",
            c="gray",
            label="FP32 accuracy at the baseline engine latency (same job)",
            zorder=2,
        )
    ax.set(xlabel="p50 latency, headline shape (ms)", ylabel="accuracy (%)", title="Quantized engine: accuracy vs latency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qdq-pipeline-report", description="(Re)generate the report of a finished or partial sweep.")
    parser.add_argument("sweep_dir", type=Path)
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"error: {args.sweep_dir} is not a folder", file=sys.stderr)
        return 2
    rows = write_report(args.sweep_dir)
    print(f"{len(rows)} jobs -> {args.sweep_dir / 'sweep_report.md'}, sweep_summary.csv, pareto.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
