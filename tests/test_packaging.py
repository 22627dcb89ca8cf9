"""A non-editable install works from any folder: build the wheel, install it into a fresh venv (the
heavy dependencies borrowed from this venv, nothing downloaded) and run the command outside the repo."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from pipeline.testing import TINY

REPO = Path(__file__).resolve().parent.parent


def _run(cmd: list, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.mark.slow
def test_wheel_installs_and_runs_from_any_folder(tmp_path):
    # Build from a copy of the sources, as a clean clone would (and so no build/ or egg-info lands in the repo).
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "conf", src / "conf", ignore=ignore)
    shutil.copytree(REPO / "pipeline", src / "pipeline", symlinks=True, ignore=ignore)  # pipeline/conf stays a link to conf/
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", tmp_path / "dist", src], tmp_path, env)
    (wheel,) = (tmp_path / "dist").glob("qdq_pipeline-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"pipeline/conf/config.yaml", "pipeline/conf/model/minilm_l6.yaml", "pipeline/conf/hydra/default.yaml"} <= names
    assert len([n for n in names if n.startswith("pipeline/conf/") and n.endswith(".yaml")]) == len(list((REPO / "conf").rglob("*.yaml")))

    # A fresh venv; this venv's site-packages appended by a plain path line (.pth files there, such as
    # the editable install's finder, are not executed, so the source tree cannot leak in).
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path, env)
    py = venv / "bin" / "python"
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, env).stdout.strip())
    (site / "borrowed_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([*pip, "--python", py, "install", "--no-deps", "--no-index", wheel], tmp_path, env)

    work = tmp_path / "elsewhere"
    work.mkdir()
    where = _run(
        [py, "-c", "import pipeline, pipeline.__main__ as m; print(pipeline.__file__); print(m.CONF_DIR)"], work, env
    ).stdout.split()
    assert where == [str(site / "pipeline" / "__init__.py"), str(site / "pipeline" / "conf")]

    exe = venv / "bin" / "qdq-pipeline"
    job = _run([exe, "--cfg", "job"], work, env).stdout
    assert "calibration:" in job and "method: percentile" in job
    run_dir = tmp_path / "run"
    _run([exe, *TINY, "benchmark=none", f"cache.dir={tmp_path}/cache", f"hydra.run.dir={run_dir}"], work, env)
    assert (run_dir / "metrics.json").exists() and (run_dir / "model_int8.onnx").exists()
    assert not list(work.iterdir())  # nothing written into the folder it was started from


def test_layer_contracts_hold():
    """Each layer imports only the layers under it and no stage imports another (pyproject [tool.importlinter];
    docs/architecture.md). An import back up, or a stage importing a stage, fails here."""
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe, "import-linter is in the test extra"
    out = subprocess.run([exe], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stdout[-3000:]
    assert "Layers: each layer imports only the layers under it KEPT" in out.stdout
    assert "Stages only orchestrate: no stage imports another stage KEPT" in out.stdout
