"""Bounded loopback load test of served ensembles: throughput and latency vs concurrency, errors counted.

Each (model, concurrency) cell sends at most `requests` requests and runs at most `seconds` seconds:
`concurrency` client threads, each with its own keep-alive HTTP connection, send one text per request
(Triton's HTTP/REST protocol, KServe v2 JSON: no client library needed) drawn in turn from real texts
(the run's eval split), and time each request from send to full response. Cells are interleaved by
concurrency (INT8, FP32, INT8, ... ) so drifts of a shared machine hit both models alike. Only loopback
addresses are accepted: this is not a tool to load anyone else's server.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import socket
import threading
import time
import urllib.parse
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.engines.base import cpu_model_name


@dataclass
class Cell:
    model: str
    precision: str
    concurrency: int
    sent: int
    ok: int
    errors: int
    seconds: float
    throughput_rps: float  # successful requests per second
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    first_error: str | None = None


def check_loopback(url: str) -> tuple[str, int]:
    """(host, port) of an http:// URL on this machine's loopback; anything else is refused."""
    u = urllib.parse.urlparse(url if "://" in url else f"http://{url}")
    if u.scheme != "http" or not u.hostname:
        raise ValueError(f"{url}: expected http://127.0.0.1:<port>")
    addrs = {ai[4][0] for ai in socket.getaddrinfo(u.hostname, u.port or 80)}
    if not all(ipaddress.ip_address(a).is_loopback for a in addrs):
        raise ValueError(f"{url}: the load test only targets loopback addresses (127.0.0.0/8, ::1); {u.hostname} is {sorted(addrs)}")
    return u.hostname, u.port or 80


def _body(text: str) -> bytes:
    return json.dumps({"inputs": [{"name": "TEXT", "shape": [1, 1], "datatype": "BYTES", "data": [text]}]}).encode("utf-8")


def run_cell(url: str, model: str, precision: str, texts: list[str], concurrency: int, requests: int, seconds: float) -> Cell:
    host, port = check_loopback(url)
    path = f"/v2/models/{model}/infer"
    bodies = [_body(t) for t in texts]
    lock = threading.Lock()
    state = {"next": 0, "ok": 0, "errors": 0, "first_error": None}
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    def take() -> int | None:
        with lock:
            if state["next"] >= requests or time.perf_counter() >= deadline:
                return None
            state["next"] += 1
            return state["next"] - 1

    def worker() -> None:
        conn = http.client.HTTPConnection(host, port, timeout=max(30.0, seconds))
        mine = []
        while (i := take()) is not None:
            t0 = time.perf_counter()
            try:
                conn.request("POST", path, bodies[i % len(bodies)], {"Content-Type": "application/json"})
                r = conn.getresponse()
                data = r.read()
                good = r.status == 200
                why = None if good else f"HTTP {r.status}: {data[:200].decode('utf-8', 'replace')}"
            except (OSError, http.client.HTTPException) as exc:
                good, why = False, f"{type(exc).__name__}: {exc}"
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=max(30.0, seconds))
            dt = time.perf_counter() - t0
            with lock:
                if good:
                    state["ok"] += 1
                    mine.append(dt)
                else:
                    state["errors"] += 1
                    state["first_error"] = state["first_error"] or why
        conn.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    pct = (lambda q: float(np.percentile(lat, q))) if len(lat) else (lambda q: None)
    return Cell(
        model,
        precision,
        concurrency,
        state["next"],
        state["ok"],
        state["errors"],
        round(wall, 3),
        state["ok"] / wall if wall > 0 else 0.0,
        pct(50),
        pct(90),
        pct(99),
        state["first_error"],
    )


def run(
    url: str,
    models: dict[str, str],
    texts: list[str],
    concurrency: list[int],
    requests: int,
    seconds: float,
    warmup: int = 8,
) -> list[Cell]:
    """models: ensemble name -> precision label. Warm-up requests per model first (not counted)."""
    for model, precision in models.items():
        run_cell(url, model, precision, texts, 1, warmup, seconds)
    cells = []
    for c in concurrency:
        for model, precision in models.items():
            cells.append(run_cell(url, model, precision, texts, c, requests, seconds))
    return cells


def cpu_name() -> str:
    return cpu_model_name()


def table(cells: list[Cell]) -> str:
    """Markdown table of the cells (docs/how-to/serve.md shows one)."""
    rows = [
        "| model | precision | concurrency | requests ok / errors | throughput (req/s) | p50 (ms) | p99 (ms) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    f = lambda v: "—" if v is None else f"{v:.1f}"  # noqa: E731
    for c in cells:
        rows.append(
            f"| {c.model} | {c.precision} | {c.concurrency} | {c.ok} / {c.errors} | {c.throughput_rps:.1f} | {f(c.p50_ms)} | {f(c.p99_ms)} |"
        )
    return "\n".join(rows) + "\n"


def plot(cells: list[Cell], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.outputs import atomic_write

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for model in dict.fromkeys(c.model for c in cells):
        mine = [c for c in cells if c.model == model]
        xs = [c.concurrency for c in mine]
        label = f"{model} ({mine[0].precision.upper()})"
        a.plot(xs, [c.throughput_rps for c in mine], "o-", label=label)
        (line,) = b.plot(xs, [c.p50_ms for c in mine], "o-", label=f"{label} p50")
        b.plot(xs, [c.p99_ms for c in mine], "s--", color=line.get_color(), label=f"{label} p99")
        for c in mine:
            if c.errors:
                a.annotate(f"{c.errors} errors", (c.concurrency, c.throughput_rps), color="red", fontsize=8)
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({c.concurrency for c in cells}), labels=[str(x) for x in sorted({c.concurrency for c in cells})])
        ax.set_xlabel("concurrent clients")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    a.set_ylabel("throughput (requests/s)")
    b.set_ylabel("latency (ms)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)
    return path


def as_json(cells: list[Cell], **extra) -> dict:
    return {**extra, "cells": [asdict(c) for c in cells]}
