"""Build llama.cpp's ``llama-server`` from PyPI sources, cache it, and run it.

The ``llama-cpp-python`` sdist on PyPI carries llama.cpp under ``vendor/llama.cpp``
(with ``tools/server``). :func:`build_llama_server` downloads that sdist with pip,
configures with cmake (static libraries, no web UI and no UI download, no curl or
OpenSSL, no tests/examples; ``GGML_NATIVE=ON``, so the binary is tuned to this CPU)
and builds the one target ``llama-server``. The binary is cached under
``$MGAUDIT_CACHE/llama-server/<key>/`` where the key holds the sdist version, the
machine and a hash of the CPU flags; a file lock makes concurrent builds wait for
one another. :class:`LlamaServer` starts it on 127.0.0.1 on a free port, waits for
``/health`` and stops it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from ..errors import ModelError, UsageError
from ..machine import cpu_flags, identity
from .process import FileLock, ServerProcess, ServerStartError, log_tail

DEFAULT_VERSION = "0.3.36"
PACKAGE = "llama-cpp-python"
TARGET = "llama-server"
CMAKE_ARGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",        # one self-contained binary in the cache
    "-DGGML_NATIVE=ON",               # tuned to this CPU: the cache key holds its flags
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",    # else the build fetches UI assets from the network
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
)


class ServerBuildError(ServerStartError):
    """llama-server could not be built (missing tools, download or compile failure)."""


class BuildToolsMissing(ServerBuildError):
    """cmake or a C++ compiler is not installed."""


@dataclass
class BuildInfo:
    binary: Path
    key: str
    version: str
    seconds: float | None  # of the build that made the cached binary
    cached: bool  # True when this call found it built
    cmake_args: list[str]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["binary"] = str(self.binary)
        return d


def _cache_root() -> Path:
    from ..models import cache_root

    return cache_root() / "llama-server"


def build_key(version: str = DEFAULT_VERSION) -> str:
    """The build cache key: the sdist version, the OS and architecture, and a digest of every ISA flag
    of this CPU (a native build is valid only where the same instructions exist)."""
    flags = hashlib.sha256(" ".join(cpu_flags()).encode()).hexdigest()[:12]
    return f"{version}-{platform.system().lower()}-{platform.machine()}-cpu{flags}"


def missing_tools() -> list[str]:
    """Build tools that are not on PATH (empty where the build can run)."""
    missing = []
    if not shutil.which("cmake"):
        missing.append("cmake")
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        missing.append("a C++ compiler (g++ or clang++)")
    return missing


def _run(cmd: list[str], cwd: Path, logf, niceness: int) -> None:
    logf.write(f"$ {' '.join(cmd)}\n")
    logf.flush()
    pre = (lambda: os.nice(niceness)) if niceness else None
    rc = subprocess.run(cmd, cwd=cwd, stdout=logf, stderr=subprocess.STDOUT, preexec_fn=pre).returncode
    if rc != 0:
        raise subprocess.CalledProcessError(rc, cmd)


def build_llama_server(version: str = DEFAULT_VERSION, jobs: int = 2, force: bool = False, niceness: int = 0,
                       log: Callable[[str], None] | None = None) -> BuildInfo:
    """The cached llama-server for this CPU, building it first where needed (minutes)."""
    log = log or (lambda m: None)
    if jobs < 1:
        raise UsageError(f"jobs {jobs} must be at least 1")
    key = build_key(version)
    root = _cache_root()
    dest = root / key
    with FileLock(root / f".{key}.lock"):
        meta_path = dest / "build.json"
        if not force and (dest / TARGET).is_file() and meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            return BuildInfo(dest / TARGET, key, version, meta.get("seconds"), True, meta.get("cmake_args", []))
        missing = missing_tools()
        if missing:
            raise BuildToolsMissing(f"cannot build llama-server: {' and '.join(missing)} not found",
                                    hint="install cmake and g++ (e.g. apt-get install cmake g++)")
        root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
        log_path = root / f"{key}.build.log"
        t0 = time.perf_counter()
        try:
            with open(log_path, "w") as logf:
                sdist = _sdist(version, root / "sdist", logf, log)
                log(f"extracting llama.cpp from {sdist.name}")
                src = _extract_llama_cpp(sdist, work)
                log(f"building llama-server {version} with cmake ({jobs} jobs; several minutes; log: {log_path})")
                build = work / "build"
                _run(["cmake", "-S", str(src), "-B", str(build), *CMAKE_ARGS], work, logf, niceness)
                _run(["cmake", "--build", str(build), "--target", TARGET, "-j", str(jobs)], work, logf, niceness)
            produced = build / "bin" / TARGET
            if not produced.is_file():
                raise ServerBuildError(f"the build finished but made no {produced}", hint=f"see {log_path}")
            seconds = time.perf_counter() - t0
            stage = Path(tempfile.mkdtemp(prefix=".stage-", dir=root))
            shutil.copy2(produced, stage / TARGET)
            (stage / "build.json").write_text(json.dumps({
                "version": version, "key": key, "seconds": round(seconds, 1), "cmake_args": list(CMAKE_ARGS),
                "jobs": jobs, "cpu_flags": cpu_flags(), "machine": identity(),
                "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }, indent=2) + "\n")
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(stage, dest)
        except subprocess.CalledProcessError as exc:
            raise ServerBuildError(f"building llama-server failed ({Path(exc.cmd[0]).name} exit {exc.returncode}): "
                                   f"{log_tail(log_path)}", hint=f"full log: {log_path}") from None
        finally:
            shutil.rmtree(work, ignore_errors=True)
        log(f"built {dest / TARGET} in {seconds:.0f} s")
        return BuildInfo(dest / TARGET, key, version, seconds, False, list(CMAKE_ARGS))


def _sdist(version: str, folder: Path, logf, log) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{PACKAGE.replace('-', '_')}-{version}.tar.gz"
    path = folder / name
    if path.is_file():
        return path
    log(f"downloading the {PACKAGE} {version} sdist from PyPI (about 77 MB)")
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", tmp,
               f"{PACKAGE}=={version}"]
        try:
            _run(cmd, folder, logf, 0)
        except subprocess.CalledProcessError:
            raise ServerBuildError(f"could not download the {PACKAGE} {version} sdist from PyPI",
                                   hint="check network access to PyPI") from None
        got = list(Path(tmp).glob("*.tar.gz"))
        if not got:
            raise ServerBuildError(f"pip downloaded no sdist of {PACKAGE} {version}")
        os.replace(got[0], path)
    return path


def _extract_llama_cpp(sdist: Path, work: Path) -> Path:
    prefix = None
    with tarfile.open(sdist, "r:gz") as tf:
        members = []
        for m in tf.getmembers():
            parts = Path(m.name).parts
            if len(parts) >= 3 and parts[1] == "vendor" and parts[2] == "llama.cpp":
                members.append(m)
                prefix = Path(*parts[:3])
        if prefix is None:
            raise ServerBuildError(f"{sdist.name} holds no vendor/llama.cpp")
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tf.extractall(work, members=members, **kwargs)
    src = work / prefix
    if not (src / "tools" / "server").is_dir():
        raise ServerBuildError(f"{sdist.name}: vendor/llama.cpp has no tools/server")
    return src


# --------------------------------------------------------------------------- running it


def default_threads() -> int:
    """Leave one core to the client: on a 2-core machine llama.cpp's spinning threads and the
    client fight for the cores, and decoding slows down by orders of magnitude."""
    return max(1, (os.cpu_count() or 2) - 1)


class LlamaServer(ServerProcess):
    """``with LlamaServer(binary, gguf, slots=8) as srv: srv.url`` (an OpenAI base URL ending in /v1)."""

    name = "llama-server"
    ready_path = "/health"

    def __init__(self, binary: Path, model: Path, *, slots: int = 8, ctx: int = 8192, threads: int | None = None,
                 extra_args: tuple[str, ...] = (), **kw):
        super().__init__(**kw)
        self.binary, self.model = Path(binary), Path(model)
        self.slots, self.ctx = slots, ctx
        self.threads = threads or default_threads()
        self.extra_args = tuple(extra_args)

    def command(self) -> list[str]:
        return [str(self.binary), "-m", str(self.model), "-np", str(self.slots), "-c", str(self.ctx),
                "-t", str(self.threads), "--host", self.host, "--port", str(self.port), *self.extra_args]

    def start(self) -> "LlamaServer":
        if not self.binary.is_file():
            raise UsageError(f"{self.binary}: no llama-server binary there", hint="build it first")
        if not self.model.is_file():
            raise ModelError(f"{self.model}: no such model file")
        return super().start()

    def describe(self) -> str:
        """The engine and its flags, for ``--engine-note``."""
        return f"llama-server -np {self.slots} -c {self.ctx} -t {self.threads}"
