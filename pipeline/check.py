"""`qdq-pipeline-check`: static legality check of ONNX graphs for an engine (today: TensorRT).

    qdq-pipeline-check outputs/<run>/<time>/model_int8_trt.onnx outputs/<run>/<time>/model_fp16.onnx --engine tensorrt

Prints `file: ok` per legal file, else one line per violation, `file: rule: node: what to change`
(rules: pipeline.engines.trt_rules.RULES). Exit status: 0 all legal, 1 any violation, 2 a bad argument
or a file that is missing or not ONNX.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import onnx

from pipeline.engines.trt_rules import RULES, Violation, check_tensorrt

CHECKERS: dict[str, Callable[[onnx.ModelProto], list[Violation]]] = {"tensorrt": check_tensorrt}


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the checker on each file and prints the result.

    Args:
        argv: command-line arguments (default: sys.argv[1:]).

    Returns:
        The exit status: 0 legal, 1 violations found, 2 bad argument or unreadable file.
    """
    ap = argparse.ArgumentParser(
        prog="qdq-pipeline-check",
        description="Check ONNX graphs against an engine's quantization rules, statically (no engine needed).",
        epilog="TensorRT rules: " + "; ".join(f"{k}: {v}" for k, v in RULES.items()),
    )
    ap.add_argument("files", nargs="+", type=Path, metavar="model.onnx")
    ap.add_argument("--engine", required=True, choices=sorted(CHECKERS))
    args = ap.parse_args(argv)
    models = {}
    for f in args.files:
        # Read everything first: a typo in the last file should not leave a half-printed report.
        if not f.is_file():
            print(f"qdq-pipeline-check: {f}: no such file", file=sys.stderr)
            return 2
        try:
            models[f] = onnx.load(str(f))
        except Exception as exc:  # DecodeError and friends: not an ONNX protobuf
            print(f"qdq-pipeline-check: {f}: not a readable ONNX model ({type(exc).__name__}: {exc})", file=sys.stderr)
            return 2
    status = 0
    for f, model in models.items():
        violations = CHECKERS[args.engine](model)
        for v in violations:
            print(v.line(f))
        if violations:
            status = 1
        else:
            print(f"{f}: ok")
    return status


if __name__ == "__main__":
    sys.exit(main())
