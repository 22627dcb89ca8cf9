"""Stage cache: reuse a stage's outputs across runs and sweep jobs.

An entry is keyed by the sha256 of the config subset the stage depends on plus the key of the stage
it consumes, the pipeline's source and the versions of the libraries that compute it, so sweep jobs
that differ only in calibration share one fine-tuned model, and a rerun of the same config with the
same code and libraries reuses every cached stage. Stages that measure built artifacts (evaluate)
add the sha256 of those files to their key. Entries live under `cache.dir` (default
outputs/.cache/<stage>/<key>/).

Safety: an entry is built in a temp folder and renamed into place (atomic), under an exclusive
file lock (concurrent jobs wanting the same entry wait, then reuse it). `entry.json` records the
sha256 of every file; a lookup re-hashes them and a missing, partial or corrupted entry is deleted
and rebuilt, never used.

Size: a lookup that hits marks the entry used (entry.json's mtime); after each store the least
recently used entries are removed until the cache holds at most `cache.max_gb`. An entry is read under
a shared lock and built under an exclusive one, and the pruning takes each entry's lock without waiting,
so an entry that another job is reading or building is never removed. Run folders hard-link the files
they restore, so removing an entry never touches a finished run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline import __version__

log = logging.getLogger(__name__)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """sha256 of the pipeline's own source: a code change invalidates every cache entry, so a cache
    can never hand back results computed by different code."""
    h = hashlib.sha256(__version__.encode())
    root = Path(__file__).resolve().parent
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


# Libraries whose version can change what a stage produces: training numerics and kernels (torch),
# model code and tokenizers (transformers), graph serialization (onnx), the engines (onnxruntime,
# tensorrt) and host-side math (numpy). Absent packages key as None.
KEY_PACKAGES = ("torch", "transformers", "onnx", "onnxruntime", "tensorrt", "numpy")


@functools.lru_cache(maxsize=1)
def library_versions() -> dict[str, str | None]:
    """Installed versions of KEY_PACKAGES: part of every key, so an upgrade never reuses old results."""
    out: dict[str, str | None] = {}
    for pkg in KEY_PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def file_digests(paths: Iterable[Path | None]) -> dict[str, str]:
    """sha256 of each existing file by name: keys results measured on artifacts (ONNX files, engine
    plans) by the exact bytes measured, so a rebuilt artifact never inherits an older measurement."""
    return {Path(p).name: _sha256(Path(p)) for p in paths if p is not None and Path(p).is_file()}


def stage_key(stage: str, *parts: Any) -> str:
    """sha256 over the stage name, the code digest, the library versions and the given config parts /
    upstream keys."""

    def plain(x: Any) -> Any:
        return dataclasses.asdict(x) if dataclasses.is_dataclass(x) else x

    blob = json.dumps([stage, code_digest(), library_versions(), *map(plain, parts)], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


class StageCache:
    def __init__(self, root: Path, enabled: bool, max_bytes: int | None = None):
        self.root = Path(root)
        self.enabled = enabled
        self.max_bytes = max_bytes

    def _entry(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def lookup(self, stage: str, key: str, *, remove_damaged: bool = True) -> Path | None:
        """The entry folder if complete and intact (and marked used). A damaged one is a miss, and is removed
        when remove_damaged (the caller holds the key's exclusive lock: no other job is reading it)."""
        if not self.enabled:
            return None
        entry = self._entry(stage, key)
        if not entry.exists():
            return None
        if self._verify(entry):
            with contextlib.suppress(OSError):
                os.utime(entry / "entry.json")  # last use, for pruning
            return entry
        if remove_damaged:
            log.warning("cache: %s/%s is incomplete or corrupted; rebuilding it", stage, key)
            shutil.rmtree(entry, ignore_errors=True)
        return None

    def _verify(self, entry: Path) -> bool:
        try:
            meta = json.loads((entry / "entry.json").read_text())
            return all((entry / f).is_file() and _sha256(entry / f) == digest for f, digest in meta["files"].items())
        except (OSError, ValueError, KeyError):
            return False

    @contextlib.contextmanager
    def lock(self, stage: str, key: str, *, shared: bool = False, wait: bool = True) -> Iterator[bool]:
        """The entry's lock: exclusive to build it (other processes wanting it wait here), shared to read it.
        With wait=False, yields False at once where another process holds a conflicting lock."""
        if not self.enabled:
            yield True
            return
        (self.root / stage).mkdir(parents=True, exist_ok=True)
        with open(self.root / stage / f"{key}.lock", "w") as fh:
            try:
                fcntl.flock(fh, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def store(self, stage: str, key: str, fill: Callable[[Path], None]) -> Path | None:
        """fill(tmp_folder) writes the entry's files; they are hashed and the folder renamed in place."""
        if not self.enabled:
            return None
        entry = self._entry(stage, key)
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=entry.parent))
        try:
            fill(tmp)
            files = {str(p.relative_to(tmp)): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
            (tmp / "entry.json").write_text(json.dumps({"stage": stage, "key": key, "files": files}, indent=1))
            if entry.exists():
                shutil.rmtree(entry)
            os.replace(tmp, entry)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return entry

    def prune(self, keep: Path | None = None) -> list[Path]:
        """Remove the folders of builds that died (a temp folder whose key nobody holds), then the least
        recently used entries until the cache holds at most max_bytes. `keep` (the entry just stored) and
        entries another process is reading or building stay; folders that are not entries (a wrong
        cache.dir) are never touched. Returns what was removed."""
        if not self.enabled or not self.root.is_dir():
            return []
        removed: list[Path] = []
        entries = []  # (last use, bytes, stage, key, folder)
        for stage_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for folder in stage_dir.iterdir():
                temp = _TEMP.fullmatch(folder.name)
                if temp:  # store()'s temp folder: its builder holds the key's lock until the rename
                    with self.lock(stage_dir.name, temp[1], wait=False) as free:
                        if free:
                            shutil.rmtree(folder, ignore_errors=True)
                            removed.append(folder)
                    continue
                if self.max_bytes is None or not _KEY.fullmatch(folder.name):
                    continue
                try:  # another job may remove an entry while this one measures it
                    used = (folder / "entry.json").stat().st_mtime
                    entries.append((used, _folder_bytes(folder), stage_dir.name, folder.name, folder))
                except OSError:
                    continue
        if self.max_bytes is None:
            return removed
        total = sum(e[1] for e in entries)
        evicted = 0
        for used, size, stage, key, folder in sorted(entries):
            if total <= self.max_bytes:
                break
            if keep is not None and folder == keep:
                continue
            with self.lock(stage, key, wait=False) as free:
                if not free:
                    continue  # being read or rebuilt right now
                try:
                    if (folder / "entry.json").stat().st_mtime > used:
                        continue  # used since the scan
                except OSError:
                    pass  # already gone
                shutil.rmtree(folder, ignore_errors=True)
            total -= size
            evicted += 1
            removed.append(folder)
        if evicted:
            log.info(
                "cache: removed %d least recently used entries; the cache folder holds %.2f GB (cache.max_gb=%g)",
                evicted,
                total / 1e9,
                self.max_bytes / 1e9,
            )
        return removed


# An entry's folder is its key (stage_key: 24 hex digits); store()'s temp folder is ".<key>.<random>".
_KEY = re.compile(r"[0-9a-f]{24}")
_TEMP = re.compile(r"\.([0-9a-f]{24})\.[^.]+")


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link a cached file (or folder tree) into a run folder; copy across filesystems."""
    if src.is_dir():
        dst.mkdir(parents=True, exist_ok=True)
        for p in src.rglob("*"):
            if p.is_file():
                link_or_copy(p, dst / p.relative_to(src))
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def cached(
    cache: StageCache, stage: str, key: str, *, compute: Callable[[], None], save: Callable[[Path], None], restore: Callable[[Path], None]
) -> bool:
    """Restore the stage from the cache, or compute it and store it. Returns True on a cache hit.

    Lookup, then lock, then look up again: of several jobs needing the same entry at once, one
    builds it and the others reuse it.
    """
    if not cache.enabled:
        compute()
        return False
    with cache.lock(stage, key, shared=True):  # a reader: the entry cannot be pruned under it
        hit = cache.lookup(stage, key, remove_damaged=False)  # others may be reading it: removed below
        if hit is not None:
            log.info("cache: %s reused from %s", stage, hit)
            restore(hit)
            return True
    with cache.lock(stage, key):
        hit = cache.lookup(stage, key)
        if hit is not None:  # another job built it while this one waited
            log.info("cache: %s reused from %s", stage, hit)
            restore(hit)
            return True
        compute()
        entry = cache.store(stage, key, save)
    try:
        cache.prune(keep=entry)
    except OSError as e:  # the stage's result is stored and in the run folder: a failed clean-up must not fail it
        log.warning("cache: pruning %s failed (%s); the cache may hold more than cache.max_gb", cache.root, e)
    return False
