"""A local inference server as a child process: started in its own process group on 127.0.0.1,
waited for until a URL answers, stopped (the whole group) on exit. llama.cpp's and vLLM's
launchers (:mod:`.llama_server`, :mod:`.vllm_server`) are built on it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import MgauditError


class ServerStartError(MgauditError):
    """A local server could not be installed, built or started."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def log_tail(path: Path | None, n: int = 3) -> str:
    """The last ``n`` non-empty lines of a log file, joined (empty where there is none)."""
    if path is None:
        return ""
    try:
        lines = [ln.strip() for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])


class FileLock:
    """``with FileLock(path):`` one process at a time (builds and installs into the shared cache)."""

    def __init__(self, path: Path):
        self.path = path
        self.fh = None

    def __enter__(self):
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.path, "w")
        fcntl.flock(self.fh, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        import fcntl

        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()
        return False


class ServerProcess:
    """``with Sub(...) as srv: srv.url`` (an OpenAI base URL ending in /v1). Subclasses give
    ``name``, ``command()`` and ``ready_path`` (polled until it answers 200)."""

    name = "server"
    ready_path = "/health"

    def __init__(self, *, host: str = "127.0.0.1", port: int | None = None, log_path: Path | None = None,
                 startup_timeout: float = 180.0, env: dict[str, str] | None = None):
        self.host = host
        self.port = port or free_port(host)
        self.log_path = Path(log_path) if log_path else None
        self.startup_timeout = startup_timeout
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.started_in: float | None = None
        self._logf = None

    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.root_url}/v1"

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self):
        self._logf = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        env = {**os.environ, **self.env} if self.env else None
        t0 = time.monotonic()
        self.proc = subprocess.Popen(self.command(), stdout=self._logf, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, env=env)
        deadline = t0 + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                detail = log_tail(self.log_path)
                self.stop()
                raise ServerStartError(f"{self.name} exited with code {code} while starting"
                                       + (f": {detail}" if detail else ""))
            try:
                with urllib.request.urlopen(f"{self.root_url}{self.ready_path}", timeout=2) as r:
                    if r.status == 200:
                        self.started_in = time.monotonic() - t0
                        return self
            except (urllib.error.URLError, OSError, ValueError):
                pass
            time.sleep(0.5)
        self.stop()
        raise ServerStartError(f"{self.name} did not answer {self.ready_path} within {self.startup_timeout:g} s"
                               + (f" (log: {self.log_path})" if self.log_path else ""))

    def stop(self) -> None:
        p = self.proc
        if p is not None and p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)  # the server and the workers it started
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
        if self._logf not in (None, subprocess.DEVNULL):
            self._logf.close()
        self._logf = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> bool:
        self.stop()
        return False
