"""benchmark: engine latency over a batch x sequence grid, FP32 and INT8 interleaved in one run
(pipeline/timing.py), peers and the real-length row included."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from pipeline.context import RunContext
from pipeline.data.batching import Encoded
from pipeline.engines.peers import FLOAT_PRECISIONS
from pipeline.schema import RunConfig
from pipeline.timing import interleaved, real_length, summary, synthetic_inputs

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
        log.info("benchmark: not timing %s: the engine has no kernels for that precision here (emulated)", skipped)
    rng = np.random.default_rng(ctx.seed)
    vocab = len(ctx.tokenizer)
    grid = []
    peers = {row["name"]: row for row in ctx.metrics.peers}  # each peer's own grid (metrics.peers)
    for batch in b.batch_sizes:
        for seq in b.seq_lens:
            inputs = synthetic_inputs(rng, vocab, batch, seq)
            # label -> timed call; labels are the engines' precisions (fp32 / fp16 / int8), then peer names
            # Engines that time themselves on the device (TensorRT: CUDA events over back-to-back enqueues on
            # its own stream); host-timed calls take turns (pipeline/timing.py).
            device_timed = {e.precision: e for e in engines.values() if callable(getattr(e, "time", None))}
            calls = {e.precision: e.bind(inputs) for e in engines.values() if e.precision not in device_timed}
            if b.include_torch:
                calls.update(_torch_calls(ctx, inputs, torch_threads))
            peer_calls = _working_peer_calls(ctx, inputs, f"b{batch}xs{seq}")
            times = interleaved({**calls, **peer_calls}, b.warmup, b.iters, b.cell_seconds, b.min_iters)
            times = {**{p: e.time(inputs, b.warmup, b.iters) for p, e in device_timed.items()}, **times}
            for label, ts in times.items():
                row = {"batch": batch, "seq": seq, "precision": label, **summary(ts), "throughput_seq_s": batch * 1000 / float(np.mean(ts)),
                       "iters": len(ts)}  # fmt: skip
                (peers[label]["grid"] if label in peer_calls else grid).append(row)
            log.info("benchmark b=%d s=%d: %s", batch, seq, {p: round(float(np.median(ts)), 2) for p, ts in times.items()})
    ctx.metrics.benchmark = {
        "grid": grid,
        "warmup": b.warmup,
        "iters": b.iters,
        "cell_seconds": b.cell_seconds,
        "engine": cfg.engine.name,
        "not_timed": skipped,
        "headline_batch": b.headline_batch,
        "headline_seq": b.headline_seq,
    }
    if b.real_length_examples:
        data = ctx.encoded["eval"]
        data = Encoded(data.features[: b.real_length_examples], data.labels[: b.real_length_examples])
        real, failed = real_length(engines | ctx.peers, ctx.tokenizer, data, b.headline_batch, b.real_length_passes)
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
        ctx.metrics.speedup_vs_best_float = best_float(
            f"{cfg.engine.name} {base} (this run's baseline)", head[base]["p50"], head[quant]["p50"], ctx.metrics.peers, b
        )
    ctx.artifacts.plots["benchmark"] = plot(grid + [r for p in ctx.metrics.peers for r in p["grid"]], ctx.path("benchmark.png"))


def best_float(baseline: str, baseline_p50: float, quantized_p50: float, peer_rows: list[dict], b) -> dict:
    """The quantized engine against the fastest float engine timed at the headline shape: our baseline
    engine or a float peer (ONNX Runtime FP32 + fusions, OpenVINO f32 / bf16 / f16 where the CPU has them).
    {baseline, p50, ratio (baseline p50 / quantized p50), candidates: {name: p50}}."""
    cands = {baseline: baseline_p50}
    for row in peer_rows:
        if row["precision"] in FLOAT_PRECISIONS and not row["error"]:
            for r in row["grid"]:
                if (r["batch"], r["seq"]) == (b.headline_batch, b.headline_seq):
                    cands[row["name"]] = r["p50"]
    name = min(cands, key=cands.get)
    return {"baseline": name, "p50": cands[name], "ratio": cands[name] / quantized_p50, "candidates": cands}


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
