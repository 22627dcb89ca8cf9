"""Sweeps: multirun with the joblib launcher, a failing job, the sweep report, the stage cache."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

from pipeline.sweep_report import main as report_main
from pipeline.testing import TINY, run_tiny


def test_multirun_with_a_failing_job_reports_all_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "-m",
            *TINY,
            "calibration=percentile",
            "calibration.percentile=99.9,101,99.99",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            f"hydra.sweep.dir={sweep}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
        env={**os.environ, "HYDRA_FULL_ERROR": "1"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {
        row["overrides"].split("calibration.percentile=")[1].split()[0]: row for row in csv.DictReader((sweep / "sweep_summary.csv").open())
    }
    assert set(rows) == {"99.9", "101", "99.99"}
    assert rows["99.9"]["status"] == rows["99.99"]["status"] == "done" and rows["101"]["status"] == "failed"
    assert "calibration.percentile: 101.0 out of range; must be in [0.0, 100.0]" in rows["101"]["error"]
    report = (sweep / "sweep_report.md").read_text()
    assert "## Failed jobs" in report and "1 failed or incomplete" in report
    assert (sweep / "pareto.png").stat().st_size > 1000
    # the fine-tuned model was computed once and reused by the other successful job (same config subset)
    cached = [row["cached_stages"] for row in rows.values() if row["status"] == "done"]
    assert sum("finetune" in c for c in cached) >= 1


def test_a_folder_holding_a_sweep_is_refused_before_any_job_runs(tmp_path):
    """Reusing hydra.sweep.dir would overwrite the old jobs' .hydra/ and pair new overrides with old
    metrics in the sweep report: refused, and nothing in the folder changes."""
    sweep = tmp_path / "sweep"
    (sweep / "0" / ".hydra").mkdir(parents=True)
    (sweep / "0" / ".hydra/overrides.yaml").write_text("- calibration=max\n")
    (sweep / "0" / "metrics.json").write_text("{}")
    before = sorted(p.relative_to(sweep).as_posix() for p in sweep.rglob("*"))
    r = subprocess.run(
        [sys.executable, "-m", "pipeline", "-m", *TINY, "calibration=max,mse", f"hydra.sweep.dir={sweep}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert r.returncode == 1
    assert f"error: hydra.sweep.dir={sweep} already holds a sweep; refusing to overwrite it." in r.stderr
    assert sorted(p.relative_to(sweep).as_posix() for p in sweep.rglob("*")) == before
    assert (sweep / "0" / ".hydra/overrides.yaml").read_text() == "- calibration=max\n"


def test_report_regenerates_for_a_partial_sweep(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    for i, method in enumerate(["max", "mse"]):
        run_tiny(sweep, [f"calibration={method}", "cache=off"], name=str(i))
        (sweep / str(i) / ".hydra").mkdir()
        (sweep / str(i) / ".hydra/overrides.yaml").write_text(f"- calibration={method}\n")
    (sweep / "1" / "metrics.json").unlink()  # a job that died before writing metrics
    assert report_main([str(sweep)]) == 0
    rows = list(csv.DictReader((sweep / "sweep_summary.csv").open()))
    assert len(rows) == 2 and {r["job"] for r in rows} == {"0", "1"}
    assert report_main([str(tmp_path / "missing")]) == 2


def _status(ctx) -> dict[str, str]:
    return {k: v.status for k, v in ctx.stages.items()}


def test_cache_reuses_every_stage_and_rebuilds_a_corrupted_entry(tmp_path):
    first = run_tiny(tmp_path, name="first")
    second = run_tiny(tmp_path, name="second")
    assert _status(second) == {
        "load": "done",
        "finetune": "cached",
        "calibrate": "cached",
        "tune": "skipped",
        "qat": "cached",
        "export": "cached",
        "build_engine": "done",
        "evaluate": "cached",
        "benchmark": "done",
        "deploy": "skipped",
        "report": "done",
    }
    assert second.metrics.accuracy == first.metrics.accuracy
    man = json.loads((tmp_path / "second/manifest.json").read_text())
    assert man["stages"]["finetune"]["status"] == "cached"
    # A different calibration reuses the fine-tune only.
    third = run_tiny(tmp_path, ["calibration=max"], name="third")
    assert _status(third)["finetune"] == "cached" and _status(third)["calibrate"] == "done"
    # Corrupt the fine-tune entry: detected by its checksums, rebuilt, never used.
    entry = next((tmp_path / "cache/finetune").glob("*/state.safetensors"))
    entry.write_bytes(entry.read_bytes()[:-10])
    fourth = run_tiny(tmp_path, name="fourth")
    assert _status(fourth)["finetune"] == "done"
    assert fourth.metrics.accuracy == first.metrics.accuracy
    # A half-written entry (no entry.json, e.g. a killed job) is not used either.
    (tmp_path / "cache/export" / first.keys["export"] / "entry.json").unlink()
    assert _status(run_tiny(tmp_path, name="fifth"))["export"] == "done"


def test_cache_off_computes_everything(tmp_path):
    run_tiny(tmp_path, name="a")
    entries = lambda: sorted((tmp_path / "cache").rglob("entry.json"))  # noqa: E731  (the cache run_tiny points at)
    before = entries()
    ctx = run_tiny(tmp_path, ["cache=off"], name="b")
    assert "cached" not in _status(ctx).values()
    assert before and entries() == before  # the cache was neither read nor written
