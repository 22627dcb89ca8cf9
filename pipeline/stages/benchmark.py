"""benchmark: engine latency over a batch x sequence grid, FP32 and INT8 interleaved in one run.

Interleaving (fp32 call, int8 call, fp32 call, ...) exposes both engines to the same machine noise,
so their ratio is fair on a shared, noisy machine even when absolute numbers drift.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from pipeline.context import RunContext
from pipeline.schema import RunConfig

log = logging.getLogger(__name__)


def run(cfg: RunConfig, ctx: RunContext) -> None:
    b = cfg.benchmark
    engines = dict(ctx.engines)
    rng = np.random.default_rng(ctx.seed)
    vocab = len(ctx.tokenizer)
    grid = []
    for batch in b.batch_sizes:
        for seq in b.seq_lens:
            inputs = {
                "input_ids": rng.integers(1000, vocab, size=(batch, seq), dtype=np.int64),
                "attention_mask": np.ones((batch, seq), dtype=np.int64),
                "token_type_ids": np.zeros((batch, seq), dtype=np.int64),
            }
            calls = {role: e.bind(inputs) for role, e in engines.items()}
            times: dict[str, list[float]] = {role: [] for role in engines}
            for _ in range(b.warmup):
                for call in calls.values():
                    call()
            for _ in range(b.iters):
                for role, call in calls.items():  # interleaved: same noise for both engines
                    t0 = time.perf_counter()
                    call()
                    times[role].append((time.perf_counter() - t0) * 1000)
            for role, ts in times.items():
                p = engines[role].precision
                row = {"batch": batch, "seq": seq, "precision": p, **summary(ts), "throughput_seq_s": batch * 1000 / float(np.mean(ts))}
                grid.append(row)
            log.info("benchmark b=%d s=%d: %s", batch, seq, {p: round(float(np.median(ts)), 2) for p, ts in times.items()})
    ctx.metrics.benchmark = {"grid": grid, "warmup": b.warmup, "iters": b.iters, "engine": cfg.engine.name}
    head = {r["precision"]: r for r in grid if r["batch"] == b.headline_batch and r["seq"] == b.headline_seq}
    ctx.metrics.latency_ms = {p: {k: r[k] for k in ("p50", "p90", "p99")} for p, r in head.items()}
    baseline = engines["fp32"].precision if "fp32" in engines else None  # fp32 (ORT) or fp16 (TensorRT)
    if baseline in head and "int8" in head:
        ctx.metrics.speedup = head[baseline]["p50"] / head["int8"]["p50"]
    ctx.artifacts.plots["benchmark"] = plot(grid, ctx.path("benchmark.png"))


def summary(ts: list[float]) -> dict[str, float]:
    a = np.asarray(ts)
    return {
        "p50": float(np.percentile(a, 50)),
        "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)),
        "mean": float(a.mean()),
    }


def plot(grid: list[dict], path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.outputs import atomic_write

    fig, ax = plt.subplots(figsize=(6.5, 4))
    styles = {"fp32": "-", "int8": "--", "fp16": ":"}
    for seq in sorted({r["seq"] for r in grid}):
        for p in sorted({r["precision"] for r in grid}):
            rows = sorted((r for r in grid if r["seq"] == seq and r["precision"] == p), key=lambda r: r["batch"])
            ax.plot([r["batch"] for r in rows], [r["p50"] for r in rows], styles.get(p, "-"), marker="o", label=f"{p} seq {seq}")
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="p50 latency (ms)", title="Engine latency (same run)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)
    return path
