"""`qdq-pipeline-loadtest URL --run RUN`: bounded loopback load test of a served run (pipeline/deploy/loadtest.py).

Sends the run's eval texts, one per request, to each served ensemble (default: every ensemble of
RUN/triton/deploy.json's repository, INT8 and FP32 side by side) at each concurrency (default 1, 8, 32),
each cell capped at --requests requests and --seconds seconds; writes serving.json and serving.png
(throughput, p50 / p99 latency vs concurrency, errors counted) into --out (default RUN/loadtest_<time>/)
and prints the table.

    qdq-pipeline-serve RUN --port 8000 &
    qdq-pipeline-loadtest http://127.0.0.1:8000 --run RUN
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="qdq-pipeline-loadtest", description=__doc__.split("\n\n")[0])
    ap.add_argument("url", help="the server's HTTP endpoint on this machine, e.g. http://127.0.0.1:8000")
    ap.add_argument("--run", type=Path, required=True, help="the served run folder (eval texts, ensemble names)")
    ap.add_argument("--variant", default="cpu", help="repository of RUN/triton being served (default cpu)")
    ap.add_argument("--models", default=None, help="comma-separated ensembles (default: all of the repository)")
    ap.add_argument("--concurrency", default="1,8,32", help="concurrent clients per cell (default 1,8,32)")
    ap.add_argument("--requests", type=int, default=400, help="at most this many requests per cell (default 400)")
    ap.add_argument("--seconds", type=float, default=30.0, help="at most this many seconds per cell (default 30)")
    ap.add_argument("--texts", type=int, default=2000, help="eval texts to cycle through (default 2000)")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default RUN/loadtest_<time>/)")
    args = ap.parse_args(argv)

    from pipeline.deploy import loadtest
    from pipeline.deploy.predictor import eval_records, load_run_config
    from pipeline.outputs import write_json, write_text

    try:
        loadtest.check_loopback(args.url)
        info = json.loads((args.run / "triton" / "deploy.json").read_text())
        served = info["repositories"][args.variant]
    except (ValueError, OSError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    models = {m: served[m]["precision"] for m in (args.models.split(",") if args.models else served)}
    cfg = load_run_config(args.run)
    texts = [r["text"] for r in eval_records(cfg, args.texts) if "text" in r]
    if not texts:
        print(f"error: task {cfg.task.name} has no single-text eval inputs to send", file=sys.stderr)
        return 2
    levels = [int(c) for c in args.concurrency.split(",")]
    t0 = time.perf_counter()
    cells = loadtest.run(args.url, models, texts, levels, args.requests, args.seconds)
    out = args.out or args.run / f"loadtest_{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    if (out / "serving.json").exists():
        print(f"error: {out / 'serving.json'} exists; refusing to overwrite it", file=sys.stderr)
        return 2
    cpu = loadtest.cpu_name()
    write_json(
        out / "serving.json",
        loadtest.as_json(
            cells,
            url=args.url,
            run=str(args.run),
            cpu=cpu,
            texts=len(texts),
            requests_per_cell=args.requests,
            seconds_per_cell=args.seconds,
            deploy={k: info[k] for k in ("max_batch_size", "dynamic_batching", "instance_group")},
            seconds=round(time.perf_counter() - t0, 1),
        ),
    )
    loadtest.plot(cells, out / "serving.png", f"{cfg.model.name} {cfg.task.name} via Triton ({args.variant}); {cpu}")
    table = loadtest.table(cells)
    write_text(out / "serving.md", f"CPU: {cpu}\n\n{table}")
    print(f"CPU: {cpu}\n\n{table}\nwritten: {out / 'serving.json'}, {out / 'serving.png'}")
    return 1 if any(c.errors for c in cells) else 0


if __name__ == "__main__":
    sys.exit(main())
