"""Start and stop the bundled Triton server on a model repository, on the loopback address only.

    with TritonServer(repo, env, http_port=8000) as server:   # returns once every model is ready
        print(server.url)

tritonserver runs in a process group of its own (start_new_session): stopping sends SIGTERM to the server
(it unloads the models and their Python stubs), waits, then SIGKILLs whatever of the group is left, so no
stub outlives it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from pipeline.deploy.env import ServeEnv

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class ServerError(RuntimeError):
    pass


class TritonServer:
    def __init__(
        self,
        repository: Path,
        env: ServeEnv,
        http_port: int = 8000,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        log_file: Path | None = None,
        log_verbose: int = 0,
    ):
        self.repository = Path(repository).resolve()
        self.env = env
        self.http_port = http_port
        self.grpc_port = grpc_port if grpc_port is not None else http_port + 1
        self.metrics_port = metrics_port if metrics_port is not None else http_port + 2
        self.log_file = Path(log_file) if log_file else None
        self.log_verbose = log_verbose
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    def command(self) -> list[str]:
        return [
            str(self.env.tritonserver),
            f"--model-repository={self.repository}",
            f"--backend-directory={self.env.backends}",
            f"--http-address={HOST}",
            f"--http-port={self.http_port}",
            f"--grpc-address={HOST}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={HOST}",
            f"--metrics-port={self.metrics_port}",
            "--allow-cpu-metrics=false",
            "--strict-readiness=true",
            "--exit-on-error=true",
            "--exit-timeout-secs=10",
            f"--log-verbose={self.log_verbose}",
        ]

    def start(self, timeout: float = 180) -> TritonServer:
        self.env.prepare_backends()
        out = subprocess.DEVNULL
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_file, "ab")  # noqa: SIM115 (closed in stop)
            out = self._log
        self.proc = subprocess.Popen(
            self.command(),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env.server_environ(),
            start_new_session=True,
        )
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"tritonserver exited with status {self.proc.returncode} before it was ready{self._log_hint()}")
            if self.ready():
                return
            time.sleep(0.25)
        raise ServerError(f"tritonserver was not ready after {timeout:.0f} s{self._log_hint()}")

    def _log_hint(self) -> str:
        if self.log_file is None or not self.log_file.exists():
            return ""
        tail = self.log_file.read_text(errors="replace").splitlines()[-25:]
        return f"; last lines of {self.log_file}:\n" + "\n".join(tail)

    def stop(self, timeout: float = 20) -> int | None:
        """SIGTERM to the server, then SIGKILL to its whole process group (stubs included)."""
        if self.proc is None:
            return None
        pgid = self.proc.pid  # start_new_session: the group id is the server's pid
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.proc.poll() is None:
            self.proc.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode

    def group_alive(self) -> bool:
        """Whether any process of the server's group is still running (tests: no orphans)."""
        if self.proc is None:
            return False
        try:
            os.killpg(self.proc.pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
