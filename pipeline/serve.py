"""`qdq-pipeline-serve RUN [--port 8000]`: serve a run's Triton model repository with the Triton server
bundled in PyPI's nvidia-pytriton, on 127.0.0.1 (pipeline/deploy/).

Uses the serving environment `.venv-serve` (created on first use; `make serve-env`), writes `RUN/triton/`
first if the run has none, checks every config.pbtxt with Triton's schema, starts tritonserver
(HTTP on --port, gRPC on --port+1, metrics on --port+2), prints the endpoint once every model is ready,
and stops it and its Python stubs on Ctrl-C / SIGTERM.

    qdq-pipeline-serve outputs/minilm_l6_movie_snippets/<time>
    make serve RUN=outputs/minilm_l6_movie_snippets/<time>
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent / "deploy"


def ensure_repository(run: Path) -> Path:
    """RUN/triton (written from the run folder when the deploy stage did not run)."""
    repo = run / "triton"
    if not (repo / "deploy.json").is_file():
        from pipeline.deploy.predictor import from_run_folder
        from pipeline.deploy.triton import TritonSettings, write_repository

        print(f"writing the Triton model repository {repo} ...", file=sys.stderr)
        cfg, spec = from_run_folder(run)
        write_repository(spec, repo, TritonSettings.from_config(cfg.deploy))
    return repo


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="qdq-pipeline-serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a finished run folder")
    ap.add_argument("--port", type=int, default=8000, help="HTTP port (gRPC: port+1, metrics: port+2); default 8000")
    ap.add_argument("--variant", default="cpu", help="repository under RUN/triton to serve (default cpu: the bundled server's)")
    ap.add_argument(
        "--venv", type=Path, default=None, help="serving environment (default: .venv-serve at the project root, or $QDQ_SERVE_VENV)"
    )
    ap.add_argument("--no-create", action="store_true", help="fail instead of creating a missing serving environment")
    ap.add_argument("--log", type=Path, default=None, help="tritonserver's log file (default: RUN/triton/tritonserver.log)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds to wait for the models to load")
    args = ap.parse_args(argv)

    from pipeline.deploy.env import ensure_env, run_in_env
    from pipeline.deploy.server import ServerError, TritonServer

    run = args.run.resolve()
    try:
        repo = ensure_repository(run)
        info = json.loads((repo / "deploy.json").read_text())
        if args.variant not in info["repositories"]:
            raise ValueError(f"{repo}: no {args.variant!r} repository ({info.get('not_written') or ', '.join(info['repositories'])})")
        env = ensure_env(args.venv, create=not args.no_create)
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    checked = run_in_env(env, HERE / "check_configs.py", str(repo / args.variant))
    if checked.returncode != 0:
        print(f"error: config.pbtxt rejected by Triton's schema:\n{checked.stdout}{checked.stderr}", file=sys.stderr)
        return 2
    server = TritonServer(repo / args.variant, env, http_port=args.port, log_file=args.log or repo / "tritonserver.log")
    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    t0 = time.perf_counter()
    try:
        server.start(args.timeout)
        models = ", ".join(f"{n} ({d['precision']})" for n, d in info["repositories"][args.variant].items())
        print(
            f"Triton ready in {time.perf_counter() - t0:.1f} s: {server.url} (HTTP/REST, KServe v2), gRPC {server.grpc_url}; "
            f"ensembles: {models}; log: {server.log_file}",
            flush=True,
        )
        print(f"try: curl -s {server.url}/v2/models/{info['task']}/infer -d "
              "'{\"inputs\":[{\"name\":\"TEXT\",\"shape\":[1,1],\"datatype\":\"BYTES\",\"data\":[\"a gorgeous, witty movie\"]}]}'",
              flush=True)  # fmt: skip
        while server.proc.poll() is None:
            time.sleep(0.5)
        print(f"error: tritonserver exited with status {server.proc.returncode}; see {server.log_file}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"stopping tritonserver ({'SIGTERM' if stop['signal'] == signal.SIGTERM else 'Ctrl-C'}) ...", file=sys.stderr, flush=True)
        return 0
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the shutdown
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
