"""benchmark: engine latency over a batch x sequence grid, FP32 and INT8 interleaved in one run.

Interleaving (fp32 call, int8 call, fp32 call, ...) exposes both engines to the same machine noise,
so their ratio is fair on a shared, noisy machine even when absolute numbers drift.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import torch

from pipeline.context import RunContext
from pipeline.data import batches
from pipeline.data.batching import Encoded
from pipeline.schema import RunConfig

log = logging.getLogger(__name__)


def run(cfg: RunConfig, ctx: RunContext) -> None:
    # torch's intra-op pool and the engines' pools are both sized to every core; while engines are
    # timed, torch (idle here) keeps one thread so the two pools never compete for the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run(cfg, ctx, threads)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: RunConfig, ctx: RunContext, torch_threads: int) -> None:
    b = cfg.benchmark
    # Engines without kernels for their precision here (FP8 on ONNX Runtime CPU) are not timed.
    engines = {k: e for k, e in ctx.engines.items() if not getattr(e, "emulated", False)}
    skipped = sorted(set(ctx.engines) - set(engines))
    if skipped:
        log.info("benchmark: not timing %s: ONNX Runtime's CPU provider has no kernels for that precision (emulated)", skipped)
    rng = np.random.default_rng(ctx.seed)
    vocab = len(ctx.tokenizer)
    grid = []
    peers = {row["name"]: row for row in ctx.metrics.peers}  # each peer's own grid (metrics.peers)
    for batch in b.batch_sizes:
        for seq in b.seq_lens:
            inputs = synthetic_inputs(rng, vocab, batch, seq)
            # label -> timed call; labels are the engines' precisions (fp32 / fp16 / int8), then peer names
            calls = {e.precision: e.bind(inputs) for e in engines.values()}
            if b.include_torch:
                calls.update(_torch_calls(ctx, inputs, torch_threads))
            peer_calls = _working_peer_calls(ctx, inputs, f"b{batch}xs{seq}")
            times = interleaved({**calls, **peer_calls}, b.warmup, b.iters)
            for label, ts in times.items():
                row = {"batch": batch, "seq": seq, "precision": label, **summary(ts), "throughput_seq_s": batch * 1000 / float(np.mean(ts))}
                (peers[label]["grid"] if label in peer_calls else grid).append(row)
            log.info("benchmark b=%d s=%d: %s", batch, seq, {p: round(float(np.median(ts)), 2) for p, ts in times.items()})
    ctx.metrics.benchmark = {
        "grid": grid,
        "warmup": b.warmup,
        "iters": b.iters,
        "engine": cfg.engine.name,
        "not_timed": skipped,
        "headline_batch": b.headline_batch,
        "headline_seq": b.headline_seq,
    }
    if b.real_length_examples:
        real, failed = real_length(ctx, engines | ctx.peers, b)
        for name, exc in failed.items():
            if name not in ctx.peers:  # our own engines must run every real shape
                raise exc
            peers[name]["error"] = f"benchmark real lengths: {type(exc).__name__}: {exc}"
            log.warning("benchmark: peer %s failed: %s", name, peers[name]["error"])
            del ctx.peers[name]
        ctx.metrics.benchmark["real_length"] = {k: v for k, v in real.items() if k not in peers}
        for name in ctx.peers:
            peers[name]["real_length"] = real[name]
    head = {r["precision"]: r for r in grid if r["batch"] == b.headline_batch and r["seq"] == b.headline_seq}
    ctx.metrics.latency_ms = {p: {k: r[k] for k in ("p50", "p90", "p99")} for p, r in head.items()}
    # speedup = baseline p50 / quantized p50: FP32 vs INT8 on ONNX Runtime, FP16 vs INT8 (or FP8) on TensorRT.
    base, quant = ctx.metrics.engine_precisions["baseline"], ctx.metrics.engine_precisions["quantized"]
    if base in head and quant in head:
        ctx.metrics.speedup = head[base]["p50"] / head[quant]["p50"]
    ctx.artifacts.plots["benchmark"] = plot(grid + [r for p in ctx.metrics.peers for r in p["grid"]], ctx.path("benchmark.png"))


def _working_peer_calls(ctx: RunContext, inputs: dict[str, np.ndarray], where: str) -> dict[str, Callable[[], None]]:
    """Each peer's timed call, tried once first: a peer that fails on these inputs (e.g. a quantized graph
    that only breaks at some shapes) becomes a row with its error and leaves the comparison; the run goes on."""
    rows = {row["name"]: row for row in ctx.metrics.peers}
    calls = {}
    for name, engine in list(ctx.peers.items()):
        try:
            call = engine.bind(inputs)
            call()
        except Exception as exc:
            rows[name]["error"] = f"benchmark {where}: {type(exc).__name__}: {exc}"
            log.warning("benchmark: peer %s failed: %s", name, rows[name]["error"])
            del ctx.peers[name]
            continue
        calls[name] = call
    return calls


def synthetic_inputs(rng: np.random.Generator, vocab: int, batch: int, seq: int) -> dict[str, np.ndarray]:
    """Random token ids, no padding: a (batch, seq) grid cell's inputs."""
    return {
        "input_ids": rng.integers(1000, vocab, size=(batch, seq), dtype=np.int64),
        "attention_mask": np.ones((batch, seq), dtype=np.int64),
        "token_type_ids": np.zeros((batch, seq), dtype=np.int64),
    }


def interleaved(calls: dict[str, Callable[[], None]], warmup: int, iters: int) -> dict[str, list[float]]:
    """Milliseconds per call of each labelled call, the calls taking turns (one noise for all)."""
    times: dict[str, list[float]] = {label: [] for label in calls}
    for _ in range(warmup):
        for call in calls.values():
            call()
    for _ in range(iters):
        for label, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[label].append((time.perf_counter() - t0) * 1000)
    return times


def real_length(ctx: RunContext, engines: dict, b) -> dict:
    """The latency a serving system sees: the eval split's real sentence lengths, length-sorted
    batches of `headline_batch` padded to their longest example (dynamic padding), every engine on
    every batch in turn; `real_length_passes` timed passes after one warm-up pass.

    Returns, per label, the milliseconds of one pass over the examples (median over passes), the
    median batch latency and the throughput; and the labels whose call raised, with the error."""
    data = ctx.encoded["eval"]
    data = Encoded(data.features[: b.real_length_examples], data.labels[: b.real_length_examples])
    feeds = [
        {k: v.numpy() for k, v in batch.inputs.items()} for batch in batches(ctx.tokenizer, data, b.headline_batch, sort_by_length=True)
    ]
    calls = [{label: e.bind(feed) for label, e in engines.items()} for feed in feeds]
    # Warm-up pass, each call on its own: an engine that fails on some real shape leaves the row
    # (failed[label] = the error) instead of stopping the run.
    failed: dict[str, Exception] = {}
    for batch_calls in calls:
        for label, call in batch_calls.items():
            if label not in failed:
                try:
                    call()
                except Exception as exc:
                    failed[label] = exc
    engines = {label: e for label, e in engines.items() if label not in failed}
    calls = [{label: c for label, c in batch_calls.items() if label in engines} for batch_calls in calls]
    per_pass: dict[str, list[float]] = {label: [] for label in engines}
    per_batch: dict[str, list[float]] = {label: [] for label in engines}
    for _ in range(b.real_length_passes):
        totals = dict.fromkeys(engines, 0.0)
        for batch_calls in calls:
            for label, ms in interleaved(batch_calls, 0, 1).items():
                totals[label] += ms[0]
                per_batch[label].append(ms[0])
        for label, t in totals.items():
            per_pass[label].append(t)
    lengths = [len(f["input_ids"]) for f in data.features]
    info = {"examples": len(data), "batch": b.headline_batch, "mean_len": float(np.mean(lengths)), "max_len": int(max(lengths))}
    out = {}
    for label in engines:
        total = float(np.median(per_pass[label]))
        out[label] = {
            **info,
            "pass_ms": total,
            "p50_batch_ms": float(np.median(per_batch[label])),
            "throughput_seq_s": len(data) * 1000 / total,
        }
    log.info(
        "benchmark real lengths (%d examples, mean %.1f tokens): %s",
        len(data),
        info["mean_len"],
        {k: round(v["pass_ms"], 1) for k, v in out.items()},
    )
    return out, failed


def _torch_calls(ctx: RunContext, inputs: dict[str, np.ndarray], threads: int) -> dict:
    """Reference rows: the FP32 and fake-quant torch models on the same inputs (fake quant simulates
    INT8 in floating point: it shows the cost of simulation, not an INT8 speed)."""
    feed = {k: torch.from_numpy(v).to(ctx.device) for k, v in inputs.items() if k != "token_type_ids" or _uses_token_types(ctx)}
    models = {"torch_fp32": ctx.fp32_model if ctx.fp32_model is not None else ctx.model}
    if ctx.quantized:
        models["torch_fake_quant"] = ctx.model

    def make(model):
        def call() -> None:
            torch.set_num_threads(threads)  # torch rows get the run's threads, engines get them back after
            with torch.no_grad():
                model.eval()(**feed)
            if ctx.device.type == "cuda":
                torch.cuda.synchronize(ctx.device)
            torch.set_num_threads(1)

        return call

    return {label: make(m) for label, m in models.items()}


def _uses_token_types(ctx: RunContext) -> bool:
    return "token_type_ids" in ctx.encoded["eval"].features[0]


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
    styles = {"fp32": "-", "int8": "--", "fp16": ":", "fp8": "--", "torch_fp32": "-.", "torch_fake_quant": "-."}
    for seq in sorted({r["seq"] for r in grid}):
        for p in sorted({r["precision"] for r in grid}):
            rows = sorted((r for r in grid if r["seq"] == seq and r["precision"] == p), key=lambda r: r["batch"])
            ax.plot(
                [r["batch"] for r in rows],
                [r["p50"] for r in rows],
                linestyle=styles.get(p, (0, (1, 1))),
                marker="o",
                label=f"{p} seq {seq}",
            )
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="p50 latency (ms)", title="Engine latency (same run)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)
    return path
