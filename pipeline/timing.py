"""Latency measurement shared by the benchmark stage, the tuner's latency probe and the benchmarks/
scripts (library layer): interleaved calls, synthetic grid inputs, the real-length pass.

Interleaving (fp32 call, int8 call, fp32 call, ...) exposes every engine to the same machine noise,
so their ratio is fair on a shared, noisy machine even when absolute numbers drift.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

from pipeline.data import batches
from pipeline.data.batching import Encoded

log = logging.getLogger(__name__)


def synthetic_inputs(rng: np.random.Generator, vocab: int, batch: int, seq: int) -> dict[str, np.ndarray]:
    """Random token ids, no padding: a (batch, seq) grid cell's inputs."""
    return {
        "input_ids": rng.integers(1000, vocab, size=(batch, seq), dtype=np.int64),
        "attention_mask": np.ones((batch, seq), dtype=np.int64),
        "token_type_ids": np.zeros((batch, seq), dtype=np.int64),
    }


def interleaved(
    calls: dict[str, Callable[[], None]], warmup: int, iters: int, max_seconds: float | None = None, min_iters: int = 1
) -> dict[str, list[float]]:
    """Milliseconds per call of each labelled call, the calls taking turns (one noise for all): `iters`
    rounds, or fewer (at least `min_iters`) once the timed rounds have taken `max_seconds`. Warm-up: `warmup`
    untimed rounds, or fewer (at least one) once they have taken a quarter of `max_seconds`."""
    times: dict[str, list[float]] = {label: [] for label in calls}
    start = time.perf_counter()
    for n in range(warmup):
        if max_seconds is not None and n >= 1 and time.perf_counter() - start > max_seconds / 4:
            break
        for call in calls.values():
            call()
    start = time.perf_counter()
    for n in range(iters):
        if max_seconds is not None and n >= min_iters and time.perf_counter() - start > max_seconds:
            break
        for label, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[label].append((time.perf_counter() - t0) * 1000)
    return times


def real_length(engines: dict, tokenizer, data: Encoded, batch_size: int, passes: int) -> tuple[dict, dict[str, Exception]]:
    """The latency a serving system sees: the eval split's real sentence lengths, length-sorted
    batches of `batch_size` padded to their longest example (dynamic padding), every engine on
    every batch in turn; `passes` timed passes after one warm-up pass.

    Returns, per label, the milliseconds of one pass over the examples (median over passes), the
    median batch latency and the throughput; and the labels whose call raised, with the error."""
    feeds = [{k: v.numpy() for k, v in batch.inputs.items()} for batch in batches(tokenizer, data, batch_size, sort_by_length=True)]
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
    for _ in range(passes):
        totals = dict.fromkeys(engines, 0.0)
        for batch_calls in calls:
            for label, ms in interleaved(batch_calls, 0, 1).items():
                totals[label] += ms[0]
                per_batch[label].append(ms[0])
        for label, t in totals.items():
            per_pass[label].append(t)
    lengths = [len(f["input_ids"]) for f in data.features]
    info = {"examples": len(data), "batch": batch_size, "mean_len": float(np.mean(lengths)), "max_len": int(max(lengths))}
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


def summary(ts: list[float]) -> dict[str, float]:
    a = np.asarray(ts)
    return {
        "p50": float(np.percentile(a, 50)),
        "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)),
        "mean": float(a.mean()),
    }
