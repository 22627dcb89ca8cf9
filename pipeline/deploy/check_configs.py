"""Parse every config.pbtxt under the given folders with Triton's own schema (strict: an unknown field or a
wrong type is an error). Runs with the serving environment's Python (it imports tritonclient):

    .venv-serve/bin/python pipeline/deploy/check_configs.py RUN/triton/cpu RUN/triton/nvidia

Prints one JSON object {path: null | error, ...} and exits 1 when any file fails. Standalone on purpose.
"""

import json
import sys
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2


def parse(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def main(folders: list[str]) -> int:
    results = {}
    for folder in folders:
        files = sorted(Path(folder).rglob("config.pbtxt"))
        if not files:
            results[folder] = "no config.pbtxt found"
        for f in files:
            try:
                cfg = parse(f)
                if cfg.name != f.parent.name:
                    raise ValueError(f"name {cfg.name!r} differs from its folder {f.parent.name!r}")
                results[str(f)] = None
            except Exception as exc:
                results[str(f)] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(results, indent=1))
    return 1 if any(results.values()) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
