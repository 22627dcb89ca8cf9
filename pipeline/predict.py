"""`qdq-pipeline-predict RUN [INPUT] [--precision int8|fp32] [--engine onnxruntime]`: predictions of a
finished run's engine as JSONL (pipeline/deploy/predictor.py).

INPUT (a file, or - / nothing for stdin): one text per line, or JSONL lines {"text": ...} (+ "text_pair"
for sentence-pair models) / {"question": ..., "context": ...} for question answering. One JSON line out per
line in, in order: the task's prediction, or {"error": ...} for a line that cannot be predicted.

    qdq-pipeline-predict outputs/minilm_l6_movie_snippets/<time> reviews.txt > predictions.jsonl
    echo "a gorgeous, witty, seductive movie." | qdq-pipeline-predict RUN --precision fp32
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def read_records(lines, fmt: str = "auto") -> list[dict]:
    """Lines -> records. auto: a line that is a JSON object is a record, any other line a text."""
    out = []
    for line in lines:
        line = line.rstrip("\r\n")
        if fmt != "text" and line.lstrip().startswith("{"):
            try:
                obj = json.loads(line)
                if isinstance(obj, dict):
                    out.append(obj)
                    continue
            except json.JSONDecodeError:
                if fmt == "jsonl":
                    out.append({"_error": "not a JSON object"})
                    continue
        elif fmt == "jsonl":
            out.append({"_error": "not a JSON object"})
            continue
        out.append({"text": line})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="qdq-pipeline-predict", description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a finished run folder (holds config.resolved.yaml and the ONNX graphs)")
    ap.add_argument("input", nargs="?", default="-", help="text or JSONL file; - = stdin (default)")
    ap.add_argument("-o", "--output", default="-", help="JSONL file to write; - = stdout (default)")
    ap.add_argument("--precision", default="int8", help="int8 (the quantized graph, default) or fp32 (the baseline)")
    ap.add_argument("--engine", default=None, help="engine to build (default: the run's, e.g. onnxruntime)")
    ap.add_argument("--batch-size", type=int, default=None, help="windows per engine call (default: the run's evaluate.batch_size)")
    ap.add_argument("--format", choices=["auto", "text", "jsonl"], default="auto")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    from pipeline.deploy.predictor import load_predictor

    try:
        predictor = load_predictor(args.run, args.precision, args.engine, args.batch_size)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.input == "-":
        records = read_records(sys.stdin, args.format)
    else:
        with open(args.input, encoding="utf-8") as src:
            records = read_records(src, args.format)
    bad = {i: r.pop("_error") for i, r in enumerate(records) if "_error" in r}
    results = predictor.predict([r for i, r in enumerate(records) if i not in bad])
    it = iter(results)
    dst = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")
    try:
        for i in range(len(records)):
            dst.write(json.dumps({"error": bad[i]} if i in bad else next(it), ensure_ascii=False) + "\n")
    finally:
        if dst is not sys.stdout:
            dst.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
