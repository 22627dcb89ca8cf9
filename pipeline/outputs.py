"""Writing run outputs: atomically (temp file + rename), never over an existing run's files."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp) for a temp file in path's folder, then rename it to path (atomic on POSIX).

    A crash mid-write leaves no half-written `path`; readers see the old file or the new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def write_json(path: Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


# Keys that name places, not experiment content: excluded from the config hash so the same experiment
# hashes the same wherever it runs.
_HASH_EXCLUDE = {"hydra", "run_name", "resume", "cache"}  # none of these change results


def config_hash(cfg: DictConfig) -> str:
    """sha256 of the resolved config without paths / run folders."""
    data = OmegaConf.to_container(cfg, resolve=True)
    data = {k: v for k, v in data.items() if k not in _HASH_EXCLUDE}
    if isinstance(data.get("model"), dict) and data["model"].get("name") == "minilm_l6":
        data["model"] = {**data["model"], "name_or_path": "<embedded>"}  # site-packages path differs per venv
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()
