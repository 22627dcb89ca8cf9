"""Run by tests/test_scaleout.py under torchrun: the real `qdq-pipeline` entry point (pipeline.__main__.cli)
on every rank, with two test-only probes written after the run into <probe_dir>:

- rank<r>.safetensors: this rank's quantizer amax and model weights at the end of its run
  (rank 0: the whole pipeline; other ranks: after the last training stage);
- rank<r>.json: the run folder this rank ran in, and every path it opened for writing, created,
  renamed into or linked during the run (a Python audit hook: open / os.mkdir / os.rename ...).

    torchrun --nproc_per_node 2 tests/scaleout_worker.py <probe_dir> <overrides...>
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_writes: list[tuple[str, str]] = []  # (event, absolute path)
_recording = True


def _audit(event: str, args: tuple) -> None:
    if not _recording:
        return
    try:
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)) and isinstance(args[2], int) and args[2] & _WRITE_FLAGS:
            _writes.append((event, os.path.abspath(os.fsdecode(args[0]))))
        elif event in ("os.mkdir", "os.symlink", "os.link"):
            _writes.append((event, os.path.abspath(os.fsdecode(args[1] if event != "os.mkdir" else args[0]))))
        elif event == "os.rename":
            _writes.append((event, os.path.abspath(os.fsdecode(args[1]))))
    except (TypeError, IndexError, ValueError):
        pass


def main() -> None:
    global _recording
    probe, overrides = Path(sys.argv[1]), sys.argv[2:]
    sys.addaudithook(_audit)

    from safetensors.torch import save_file

    import pipeline.__main__ as entry
    from pipeline.training import state_for_safetensors

    captured = {}
    real_run = entry.run_pipeline

    def run_and_capture(cfg, run_dir):
        ctx = real_run(cfg, run_dir)
        captured["ctx"] = ctx
        return ctx

    entry.run_pipeline = run_and_capture
    rank = os.environ.get("RANK", "0")
    sys.argv = ["qdq-pipeline", *overrides]
    try:
        entry.cli()
    finally:
        _recording = False
        ctx = captured.get("ctx")
        probe.mkdir(parents=True, exist_ok=True)
        info = {"rank": int(rank), "run_dir": str(ctx.run_dir) if ctx else None, "writes": _writes}
        if ctx is not None:
            tensors = {f"amax/{n}": q.amax.detach().cpu().clone() for n, q in ctx.quantizers.items() if q.amax is not None}
            tensors.update({f"weight/{k}": v for k, v in state_for_safetensors(ctx.model).items()})
            save_file(tensors, str(probe / f"rank{rank}.safetensors"))
            info["training"] = ctx.metrics.training
        (probe / f"rank{rank}.json").write_text(json.dumps(info))


if __name__ == "__main__":
    main()
