"""The serving environment `.venv-serve`: the Triton server binary and what its Python backend imports.

PyPI's nvidia-pytriton 0.7.0 carries tritonserver 2.51 with the Python backend only
(`pytriton/tritonserver/{bin,backends,python_backend_stubs/<python version>}`). It pins numpy<2, so it lives
in its own virtual environment, lean (no torch): numpy<2, nvidia-pytriton, tritonclient[all], tokenizers,
onnxruntime, openvino (SERVE_REQUIREMENTS: the Python-backend model runs the run's CPU engine). The Python backend runs each model in a stub process; the stub for the
environment's Python version is copied into a backend folder of our own (`<env>/triton-backends/python/`,
beside libtriton_python.so and triton_python_backend_utils.py), so the wheel's files stay untouched.

    python -m pipeline.deploy.env [PATH]      # create it when missing or incomplete (make serve-env)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# The one list of what serving needs (make serve-env and qdq-pipeline-serve both install it).
SERVE_REQUIREMENTS = ["numpy<2", "nvidia-pytriton==0.7.0", "tritonclient[all]", "tokenizers", "onnxruntime", "openvino"]
ENV_VAR = "QDQ_SERVE_VENV"


def project_root() -> Path:
    return Path(__file__).resolve().parents[2]


def default_env_path() -> Path:
    """$QDQ_SERVE_VENV, else .venv-serve at the project's root (beside .venv)."""
    return Path(os.environ.get(ENV_VAR) or project_root() / ".venv-serve")


@dataclass
class ServeEnv:
    path: Path
    python: Path
    version: str  # "3.11"
    libdir: str  # where the environment's libpython lives (the stub links against libpythonX.Y.so)
    pytriton: Path  # site-packages/pytriton

    @property
    def tritonserver(self) -> Path:
        return self.pytriton / "tritonserver" / "bin" / "tritonserver"

    @property
    def libs(self) -> Path:
        return self.pytriton.parent / "nvidia_pytriton.libs"

    @property
    def backends(self) -> Path:
        return self.path / "triton-backends"

    def prepare_backends(self) -> Path:
        """<env>/triton-backends/python: the wheel's Python backend + the stub for this Python (copied once)."""
        dst = self.backends / "python"
        src = self.pytriton / "tritonserver" / "backends" / "python"
        stub = self.pytriton / "tritonserver" / "python_backend_stubs" / self.version / "triton_python_backend_stub"
        if not stub.is_file():
            have = sorted(p.name for p in stub.parent.parent.iterdir())
            raise RuntimeError(f"nvidia-pytriton has no Python backend stub for Python {self.version} (it has {', '.join(have)})")
        dst.mkdir(parents=True, exist_ok=True)
        for f in (src / "libtriton_python.so", src / "triton_python_backend_utils.py", stub):
            target = dst / f.name
            if not target.exists() or target.stat().st_size != f.stat().st_size:
                tmp = dst / f".{f.name}.tmp"
                shutil.copy2(f, tmp)
                os.replace(tmp, target)
        return self.backends

    def server_environ(self) -> dict[str, str]:
        """Environment of tritonserver: its bundled libraries and this Python's libpython on the loader
        path; the environment's bin first on PATH (the embedded interpreter of each stub finds its
        prefix, and so the environment's site-packages, from the `python3` on PATH, as PyTriton does)."""
        env = dict(os.environ)
        ld = [self.libdir, str(self.libs)] + ([env["LD_LIBRARY_PATH"]] if env.get("LD_LIBRARY_PATH") else [])
        env["LD_LIBRARY_PATH"] = ":".join(ld)
        env["PATH"] = f"{self.path / 'bin'}:{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(self.path)
        env["PYTHONNOUSERSITE"] = "1"
        for k in ("PYTHONPATH", "PYTHONHOME"):  # the main environment's paths must not leak into the stubs
            env.pop(k, None)
        return env


def find_env(path: Path | None = None) -> ServeEnv | None:
    """The serving environment at `path` when it is complete (its Python imports every SERVE_REQUIREMENTS
    module; an older one without openvino is completed by create_env), else None."""
    path = Path(path or default_env_path())
    python = path / "bin" / "python"
    if not python.exists():
        return None
    probe = (
        "import json, sys, sysconfig, pathlib, pytriton, tritonclient, tokenizers, onnxruntime, openvino, numpy;"
        "print(json.dumps({'version': f'{sys.version_info[0]}.{sys.version_info[1]}',"
        "'libdir': sysconfig.get_config_var('LIBDIR') or '', 'pytriton': str(pathlib.Path(pytriton.__file__).parent)}))"
    )
    r = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, env=_clean_env())
    if r.returncode != 0:
        return None
    d = json.loads(r.stdout.strip().splitlines()[-1])
    return ServeEnv(path, python, d["version"], d["libdir"], Path(d["pytriton"]))


def create_env(path: Path | None = None, python: str | None = None, quiet: bool = True) -> ServeEnv:
    """Create (or complete) the serving environment: a venv of `python` (default: this interpreter's base
    Python) with SERVE_REQUIREMENTS. Raises RuntimeError with pip's message when the install fails
    (e.g. no network)."""
    path = Path(path or default_env_path())
    base = python or getattr(sys, "_base_executable", sys.executable)
    if not (path / "bin" / "python").exists():
        subprocess.run([base, "-m", "venv", str(path)], check=True, env=_clean_env())
    cmd = [
        str(path / "bin" / "python"),
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        *(["-q"] if quiet else []),
        *SERVE_REQUIREMENTS,
    ]
    r = subprocess.run(cmd, capture_output=quiet, text=True, env=_clean_env())
    if r.returncode != 0:
        raise RuntimeError(
            f"could not install the serving environment {path} ({' '.join(SERVE_REQUIREMENTS)}):\n{(r.stderr or '')[-2000:]}"
        )
    env = find_env(path)
    if env is None:
        raise RuntimeError(f"{path}: installed, but its Python cannot import pytriton / tritonclient / tokenizers / onnxruntime / openvino")
    env.prepare_backends()
    return env


def ensure_env(path: Path | None = None, create: bool = True) -> ServeEnv:
    """The serving environment, created first when missing (create=False: raise instead)."""
    env = find_env(path)
    if env is None:
        if not create:
            raise RuntimeError(f"no serving environment at {path or default_env_path()}: run `make serve-env`")
        print(f"creating the serving environment {path or default_env_path()} ({', '.join(SERVE_REQUIREMENTS)}) ...", file=sys.stderr)
        env = create_env(path)
    env.prepare_backends()
    return env


def run_in_env(env: ServeEnv, script: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run one of the standalone scripts of pipeline/deploy (check_configs.py, triton_client.py) with the
    serving environment's Python."""
    return subprocess.run([str(env.python), str(script), *args], capture_output=True, text=True, timeout=timeout, env=_clean_env())


def _clean_env() -> dict[str, str]:
    env = dict(os.environ)
    for k in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
        env.pop(k, None)
    return env


if __name__ == "__main__":
    made = ensure_env(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
    print(f"serving environment ready: {made.path} (Python {made.version}, tritonserver {made.tritonserver})")
