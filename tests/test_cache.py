"""Stage cache keys: a result is reused only when the code, the library versions and (for measured
numbers) the very artifact bytes are the ones it was computed from."""

from __future__ import annotations

import os
import shutil

import onnx

import pipeline.cache as cache
import pipeline.run as run_module
import pipeline.stages.export as export_stage
from pipeline.outputs import atomic_write
from pipeline.testing import run_tiny

FAST = ["benchmark=none", "qat=none"]
CACHED_STAGES = ("finetune", "calibrate", "export", "evaluate")


def _status(ctx) -> dict[str, str]:
    return {k: ctx.stages[k].status for k in CACHED_STAGES}


def test_a_different_library_version_misses_every_entry(tmp_path, monkeypatch):
    run_tiny(tmp_path, FAST, name="first")
    real = cache.library_versions()
    assert set(real) == {"torch", "transformers", "onnx", "onnxruntime", "tensorrt", "numpy"} and real["torch"]
    monkeypatch.setattr(cache, "library_versions", lambda: {**real, "onnxruntime": "0.0.1"})
    upgraded = run_tiny(tmp_path, FAST, name="upgraded")
    assert set(_status(upgraded).values()) == {"done"}
    monkeypatch.undo()
    again = run_tiny(tmp_path, FAST, name="again")  # the original versions still find their entries
    assert set(_status(again).values()) == {"cached"}


def test_evaluate_is_not_reused_for_onnx_files_with_other_bytes(tmp_path, monkeypatch):
    first = run_tiny(tmp_path, FAST, name="first")
    real = export_stage.run

    def rebuilt(cfg, ctx):
        """The export entry is reused, then the INT8 graph is replaced by one with other bytes (as a
        rebuild by another exporter version would leave it); evaluate must measure it afresh."""
        status = real(cfg, ctx)
        model = onnx.load(str(ctx.path("model_int8.onnx")))
        model.doc_string = "rebuilt"
        atomic_write(ctx.path("model_int8.onnx"), lambda p: onnx.save(model, str(p)))  # new file: the cache's hard link stays intact
        return status

    monkeypatch.setattr(run_module, "STAGES", [(n, rebuilt if n == "export" else s, on) for n, s, on in run_module.STAGES])
    second = run_tiny(tmp_path, FAST, name="second")
    assert _status(second) == {"finetune": "cached", "calibrate": "cached", "export": "cached", "evaluate": "done"}
    monkeypatch.undo()
    third = run_tiny(tmp_path, FAST, name="third")  # the original bytes again: the original numbers
    assert _status(third)["evaluate"] == "cached" and third.metrics.accuracy == first.metrics.accuracy


def test_a_stage_declares_what_it_produces_and_the_cache_puts_exactly_that_back(tmp_path):
    """RunContext.cached: the files, metrics sections and model state a stage declares are stored once and
    restored on a hit (compute not called); nothing else is."""
    import torch

    from pipeline.context import Produces, RunContext

    def context(name):
        ctx = RunContext(tmp_path / name, torch.device("cpu"), 0, "h", cache=cache.StageCache(tmp_path / "cache", True))
        ctx.run_dir.mkdir()
        ctx.model = torch.nn.Linear(3, 2)
        return ctx

    produces = Produces(files=("out.txt", "folder", "absent.bin"), metrics=("accuracy", "quantization.onnx_int8"), model_state=True)
    calls = []

    def compute(ctx):
        calls.append(ctx.run_dir.name)
        (ctx.path("out.txt")).write_text("made")
        (ctx.path("folder") / "a").mkdir(parents=True)
        (ctx.path("folder") / "a" / "b.json").write_text("{}")
        ctx.metrics.accuracy = {"fp32": 0.5}
        ctx.metrics.quantization.onnx_int8, ctx.metrics.quantization.method = {"MatMul": 2}, "not declared"
        with torch.no_grad():
            ctx.model.weight.fill_(7.0)

    first = context("first")
    assert first.cached("stage", "k1", produces, lambda: compute(first)) is False
    second = context("second")
    assert second.cached("stage", "k1", produces, lambda: compute(second)) is True
    assert calls == ["first"]  # the hit computed nothing
    assert (second.path("out.txt")).read_text() == "made" and (second.path("folder") / "a" / "b.json").exists()
    assert not second.path("absent.bin").exists()
    assert second.metrics.accuracy == {"fp32": 0.5} and second.metrics.quantization.as_dict() == {"onnx_int8": {"MatMul": 2}}
    assert torch.equal(second.model.weight, torch.full((2, 3), 7.0))
    other = context("other")  # another key: computed afresh
    assert other.cached("stage", "k2", produces, lambda: compute(other)) is False and calls == ["first", "other"]


def _blob(n: int):
    return lambda tmp: (tmp / "blob.bin").write_bytes(b"x" * n)


A, B, C, D = (ch * 24 for ch in "abcd")  # keys as stage_key makes them (24 hex digits)


def _stored(c: cache.StageCache, keys: list[str], n: int = 1000) -> dict[str, object]:
    """Entries stored one by one with last-use times 100, 200, ... (explicit: file times are coarse)."""
    out = {}
    for i, k in enumerate(keys):
        out[k] = c.store("finetune", k, _blob(n))
        os.utime(out[k] / "entry.json", (100 * (i + 1), 100 * (i + 1)))
    return out


def test_pruning_removes_the_least_recently_used_entries_down_to_the_cap(tmp_path):
    c = cache.StageCache(tmp_path, True)
    e = _stored(c, [A, B, C])
    size = cache._folder_bytes(e[A])
    c.max_bytes = 3 * size
    assert c.lookup("finetune", A) == e[A]  # a hit: A is now the most recently used
    d = c.store("finetune", D, _blob(1000))
    assert c.prune(keep=d) == [e[B]]  # the least recently used of B, C (A was just used, D just stored)
    assert {p.name for p in (tmp_path / "finetune").iterdir() if p.is_dir()} == {A, C, D}
    not_ours = tmp_path / "outputs" / "2026-12-06"  # a wrong cache.dir: run folders are not entries
    not_ours.mkdir(parents=True)
    (not_ours / "model.onnx").write_bytes(b"x" * 5000)
    c.max_bytes = 0
    assert c.prune(keep=d) == [e[C], e[A]]  # oldest first; the kept entry stays even over the cap
    assert c.lookup("finetune", D) == d and (not_ours / "model.onnx").is_file()


def test_pruning_never_removes_an_entry_being_read_or_a_build_in_progress(tmp_path):
    c = cache.StageCache(tmp_path, True, max_bytes=0)
    e = _stored(c, [A, B])
    dead = tmp_path / "finetune" / f".{C}.x7y8"  # a build that died: nobody holds C's lock
    live = tmp_path / "finetune" / f".{D}.z9w0"  # a build in progress: its process holds D's lock
    for folder in (dead, live):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
    with c.lock("finetune", A, shared=True), c.lock("finetune", D):
        removed = c.prune()
    assert set(removed) == {dead, e[B]}
    assert e[A].is_dir() and live.is_dir()
    c.max_bytes = None  # no cap: only dead builds go (D's builder has let go of its lock: it died)
    assert c.prune() == [live] and e[A].is_dir()


def test_a_job_pruning_the_cache_never_removes_the_entry_another_is_restoring(tmp_path):
    """cached() restores under the entry's shared lock: a prune in the middle of it (another sweep job's,
    over the cap) skips that entry. flock conflicts between two opens of a file in one process too."""
    c = cache.StageCache(tmp_path, True)
    e = _stored(c, [A, B])
    c.max_bytes = 0
    seen = []

    def restore(entry):
        seen.append(c.prune())
        assert (entry / "blob.bin").read_bytes() == b"x" * 1000

    assert cache.cached(c, "finetune", A, compute=None, save=None, restore=restore)
    assert seen == [[e[B]]] and e[A].is_dir()


def test_an_entry_removed_while_a_job_measures_the_cache_does_not_fail_that_job(tmp_path, monkeypatch):
    c = cache.StageCache(tmp_path, True, max_bytes=0)
    e = _stored(c, [A, B])

    def raced(folder):
        files = [p for p in folder.rglob("*") if p.is_file()]
        if folder == e[A]:  # another job prunes A between this job's listing of its files and their sizes
            shutil.rmtree(folder)
        return sum(p.stat().st_size for p in files)

    monkeypatch.setattr(cache, "_folder_bytes", raced)
    made = []
    hit = cache.cached(c, "finetune", C, compute=lambda: made.append(1), save=_blob(10), restore=None)
    assert not hit and made == [1]
    assert {p.name for p in (tmp_path / "finetune").iterdir() if p.is_dir()} == {C}


def test_a_capped_cache_still_runs_and_ends_holding_only_the_last_entry(tmp_path):
    first = run_tiny(tmp_path, [*FAST, "cache.max_gb=0"], name="first")
    entries = [p for p in (tmp_path / "cache").glob("*/*") if p.is_dir() and not p.name.startswith(".")]
    assert [p.parent.name for p in entries] == ["evaluate"]  # every store pruned the others
    second = run_tiny(tmp_path, [*FAST, "cache.max_gb=0"], name="second")
    assert set(_status(second).values()) == {"done"}  # pruned: recomputed, not half-restored
    assert second.metrics.accuracy == first.metrics.accuracy
    third = run_tiny(tmp_path, FAST, name="third")  # the default cap keeps everything this small
    fourth = run_tiny(tmp_path, FAST, name="fourth")
    assert _status(third)["finetune"] == "done" and set(_status(fourth).values()) == {"cached"}
