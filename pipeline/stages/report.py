"""report: metrics.json (the contract in design.md), report.md with the same numbers, and a short
table printed at the end of the run."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from pipeline.context import RunContext
from pipeline.engines import PRECISION_NAMES
from pipeline.outputs import write_json, write_text
from pipeline.quantization import calibration_plot
from pipeline.schema import RunConfig
from pipeline.tune import report as tune_report

log = logging.getLogger(__name__)


def metrics_dict(cfg: RunConfig, ctx: RunContext) -> dict:
    m = ctx.metrics
    return {
        "config_hash": ctx.config_hash,
        "model": cfg.model.name,
        "task": cfg.task.name,
        "data": cfg.data.name,
        "accuracy": m.accuracy,
        "parity": m.parity,
        "latency_ms": m.latency_ms,
        "speedup": m.speedup,
        "speedup_vs_best_float": m.speedup_vs_best_float,
        "engine_choice": m.engine_choice,
        "engine_precisions": m.engine_precisions,
        "tensorrt_graphs": m.tensorrt_graphs,
        "benchmark": m.benchmark,
        "peers": m.peers,
        "tune": m.tune,
        "quantization": m.quantization.as_dict(),
        "training": m.training,
        **({cfg.task.name: m.task} if m.task else {}),  # the task's own metrics (e.g. "embedding")
        "stages": {k: dataclasses.asdict(v) for k, v in ctx.stages.items()},
    }


def write_metrics(cfg: RunConfig, ctx: RunContext) -> dict:
    d = metrics_dict(cfg, ctx)
    write_json(ctx.path("metrics.json"), d)
    return d


def run(cfg: RunConfig, ctx: RunContext) -> None:
    d = write_metrics(cfg, ctx)
    table = summary_table(d, ctx.run_dir, ctx.task)
    write_text(ctx.path("report.md"), render(d, cfg, ctx, table))
    print("\n" + table + "\n", flush=True)


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f} %"


def _ms(d: dict, p: str) -> str:
    return f"{d['latency_ms'][p]['p50']:.2f} ms" if p in d["latency_ms"] else "—"


def summary_table(d: dict, run_dir: Path, task=None) -> str:
    """The headline table; `task` (pipeline/tasks/) words its score, parity and adds its own rows."""
    from pipeline.tasks.sequence_classification import argmax_cosine_row

    parity_text = task.parity_text if task is not None else argmax_cosine_row
    score = getattr(task, "score_name", "accuracy")
    acc = d["accuracy"]
    prec = d.get("engine_precisions") or {}
    base, quant = prec.get("baseline") or "fp32", prec.get("quantized") or "int8"
    B, Q = PRECISION_NAMES[base], PRECISION_NAMES[quant]
    rows = [
        (f"{score} FP32 (torch)", _pct(acc["fp32"])),
        (f"{score} fake-quant (torch)", _pct(acc["fake_quant"])),
        (f"{score} engine {B}", _pct(acc.get(f"engine_{base}"))),
        (f"{score} engine {Q}", _pct(acc.get(quant))),
        (f"parity {Q} vs fake-quant", parity_text(d["parity"])),
    ]
    if task is not None:
        rows += task.report_rows(d)
    # TensorRT's graphs run through ONNX Runtime (CPU): what TensorRT would compute, checked here.
    for label, title in (("trt_graph_fp16", "model_fp16.onnx"), ("trt_graph_int8", "model_int8_trt.onnx")):
        if acc.get(label) is not None:
            rows.append((f"{score} TensorRT graph {title} (ORT CPU)", _pct(acc[label])))
    p = d.get("tensorrt_graphs", {}).get("trt_graph_int8", {}).get("parity_vs_fake_quant")
    if p:
        rows.append(("parity TensorRT INT8 graph vs fake-quant", parity_text(p)))
    if d["latency_ms"]:
        head = _headline(d)
        rows += [(f"latency p50 {B} ({head})", _ms(d, base)), (f"latency p50 {Q} ({head})", _ms(d, quant))]
        rows.append((f"speedup ({B} p50 / {Q} p50)", "—" if d["speedup"] is None else f"{d['speedup']:.2f}x"))
        best = d.get("speedup_vs_best_float")
        if best:
            rows.append(
                (f"speedup vs the fastest float engine here ({best['baseline']}, p50 {best['p50']:.2f} ms)", f"{best['ratio']:.2f}x")
            )
    prec = d["quantization"].get("engine_inference_precision")
    if prec:
        why = d["quantization"].get("engine_inference_precision_why")
        text = ", ".join(f"{PRECISION_NAMES.get(k, k)} engine: {v}" for k, v in prec.items()) + (f" ({why})" if why else "")
        rows.append(("OpenVINO float-layer precision", text))
    kern = d["quantization"].get("engine_kernels", {}).get(quant)
    if kern:
        rows.append((f"{Q} engine GEMM kernels", ", ".join(f"{k} {v}" for k, v in kern.items())))
    rows.append(("outputs", str(run_dir)))
    w = max(len(k) for k, _ in rows)
    return "\n".join([f"| {'':{w}} | value |", f"|{'-' * (w + 2)}|-------|"] + [f"| {k:{w}} | {v} |" for k, v in rows])


def _headline(d: dict) -> str:
    grid = d["benchmark"]["grid"]
    lat = d["latency_ms"]
    for r in grid:
        if r["precision"] in lat and r["p50"] == lat[r["precision"]]["p50"]:
            return f"batch {r['batch']} x seq {r['seq']}"
    return "headline shape"


def render(d: dict, cfg: RunConfig, ctx: RunContext, table: str) -> str:
    lines = [
        f"# qdq-pipeline report: {cfg.model.name} on {cfg.data.name} (task {cfg.task.name})",
        "",
        f"config hash `{d['config_hash'][:16]}`, seed {ctx.seed}",
        "",
        table,
        "",
    ]
    q = d["quantization"]
    if q:
        lines += [
            "## Quantization",
            "",
            f"- calibration: {q.get('method')}; quantizers: {q.get('quantizers')} ({q.get('enabled_by_role')})",
        ]
        if "weight_range" in q:
            w = q["weight_range"]
            lines.append(f"- weight range: {w['resolved']} (quant.weight_range={w['asked']}: {w['why']})")
        if "quantized_gemms" in q:
            g = q["quantized_gemms"]
            lines.append(
                f"- GEMMs with Q/DQ on both inputs (modules): {g['linear']} Linear, {g['attention_qk']} attention Q·Kᵀ, "
                f"{g['attention_pv']} attention P·V, {g['attention_rel']} relative-position (DeBERTa)"
            )
        if "onnx_int8" in q:
            lines.append(f"- model_int8.onnx: {q['onnx_int8']}")
        for name, info in q.get("onnx_tensorrt", {}).items():
            lines.append(f"- {name} (TensorRT, strongly typed): {info}")
        for info in d.get("tensorrt_graphs", {}).values():
            if info.get("ort_cpu_fp32_fallback_ops"):
                lines.append(
                    f"- {info['file']} through ONNX Runtime CPU: ops with no FP16 kernel there, computed in FP32 on FP16-rounded "
                    f"inputs and rounded back to FP16: {info['ort_cpu_fp32_fallback_ops']}"
                )
        for p, k in q.get("engine_kernels", {}).items():
            lines.append(f"- {p} engine GEMM kernels (what the engine actually runs): {k}")
        lines.append("")
    if cfg.calibration.method != "none":
        lines += calibration_plot.report_lines(ctx.run_dir, cfg.calibration.method)
    if d["benchmark"].get("grid"):
        lines += [
            "## Benchmark (same run, interleaved)",
            "",
            "| batch | seq | precision | p50 ms | p90 ms | p99 ms | seq/s |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in d["benchmark"]["grid"]:
            lines.append(
                f"| {r['batch']} | {r['seq']} | {r['precision']} | {r['p50']:.2f} | {r['p90']:.2f} | {r['p99']:.2f} | {r['throughput_seq_s']:.1f} |"
            )
        lines += ["", "![latency](benchmark.png)", ""]
    if d.get("tune"):
        lines += tune_report.report_lines(d)
    if d.get("peers"):
        lines += peer_table(d)
    if d["training"]:
        lines += ["## Training", ""]
        for name, t in d["training"].items():
            lines.append(f"- {name}: {t['steps']} steps, {t['seconds']} s, final loss {t['final_loss']}; curve `loss_{name}.png`")
        lines.append("")
    lines += ["## Stages", "", "| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {k} | {v['status']} | {v['seconds']:.1f} |" for k, v in d["stages"].items()]
    return "\n".join(lines) + "\n"


def peer_table(d: dict) -> list[str]:
    """Our engines next to ONNX Runtime's own quantizers (benchmark.peers): accuracy, Δ vs the FP32
    engine, p50 per grid cell, the INT8/FP32 ratio at the headline shape, the real-length pass."""
    grid = d["benchmark"]["grid"]
    cells = sorted({(r["batch"], r["seq"]) for r in grid})
    base = (d.get("engine_precisions") or {}).get("baseline") or "fp32"
    ours = {p: {(r["batch"], r["seq"]): r["p50"] for r in grid if r["precision"] == p} for p in {r["precision"] for r in grid}}
    real = d["benchmark"].get("real_length", {})
    acc = d["accuracy"]
    rows = [
        (f"this project {PRECISION_NAMES.get(p, p)}", acc.get(f"engine_{p}") if p == base else acc.get(p), ours[p], real.get(p), None)
        for p in ours
    ]
    for peer in d["peers"]:
        cell = {(r["batch"], r["seq"]): r["p50"] for r in peer["grid"]}
        rows.append((f"`{peer['name']}`", peer["accuracy"], cell, peer.get("real_length"), peer["error"]))
    ref_acc, ref = acc.get(f"engine_{base}"), ours.get(base, {})
    head = (d["benchmark"].get("headline_batch"), d["benchmark"].get("headline_seq"))
    head = head if head in ref else (cells[-1] if cells else None)
    header = (
        ["model", "accuracy", "Δ pt"]
        + [f"p50 b{b}×s{s} ms" for b, s in cells]
        + [f"ratio vs {PRECISION_NAMES.get(base, base)} b{head[0]}×s{head[1]}" if head else "ratio"]
    )
    header.append("real lengths: ms per pass")
    out = ["## Peer comparison (ONNX Runtime's own quantizers, same run)", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, a, cell, rl, err in rows:
        if err:
            err = " ".join(str(err).split()).replace("|", "/")[:300]  # one table cell
            out.append(f"| {name} | {_pct(a)} | failed: {err} |" + " |" * (len(header) - 3))
            continue
        delta = "—" if a is None or ref_acc is None else f"{100 * (a - ref_acc):+.2f}"
        ratio = f"{cell[head] / ref[head]:.3f}" if head in cell and head in ref else "—"
        times = [f"{cell[c]:.2f}" if c in cell else "—" for c in cells]
        out.append("| " + " | ".join([name, _pct(a), delta, *times, ratio, f"{rl['pass_ms']:.0f}" if rl else "—"]) + " |")
    fastest = []
    for c in cells:
        timed = {name: cell[c] for name, _, cell, _, err in rows if not err and c in cell}
        if timed:
            fastest.append(f"b{c[0]}×s{c[1]}: {min(timed, key=timed.get)}")
    out += ["", f"Fastest per cell: {'; '.join(fastest)}.", ""]
    out += [f"- `{p['name']}`: {p['description']}" for p in d["peers"]] + [""]
    out += _peers_below(d, ref_acc)
    return out


def _peers_below(d: dict, ref_acc: float | None) -> list[str]:
    """Why a peer ends more than 2 pt below the baseline engine: its drop with the paired interval (is it
    real?) and what its recipe does that costs accuracy (engines/peers.py Peer.caveat)."""
    from pipeline.engines.peers import PEERS

    lines = []
    for p in d["peers"]:
        if ref_acc is None or p["accuracy"] is None or ref_acc - p["accuracy"] <= 0.02:
            continue
        paired = (d.get(d.get("task") or "", {}) or {}).get(p["name"]) or {}
        ci = f" (paired 95 % interval ± {paired['drop_ci95_pt']:.2f} pt)" if paired.get("drop_ci95_pt") is not None else ""
        caveat = PEERS[p["name"]].caveat if p["name"] in PEERS else ""
        lines.append(
            f"- **`{p['name']}` is {100 * (ref_acc - p['accuracy']):.2f} pt below the baseline engine**{ci}: {caveat or 'no known cause recorded'}."
        )
    return lines + [""] if lines else []
