"""Is the Hugging Face Hub usable? Answered in seconds, before any Hub download.

Without this, an offline machine spends about 50 s in huggingface_hub's retries
(and prints two dozen lines of them) before an ``hf:`` dataset or a Hub model id
fails. :func:`unavailable` says why the Hub cannot be used - offline mode is set
(``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE`` or ``TRANSFORMERS_OFFLINE``), or one
quick request to the endpoint (``HF_ENDPOINT``, default https://huggingface.co)
got no answer - and :func:`local_only` makes the Hugging Face libraries read
their local cache and nothing else for a block, so a cached dataset or model
still loads.
"""

from __future__ import annotations

import os
import threading
import urllib.error
import urllib.request
from contextlib import contextmanager
from typing import Iterator

DEFAULT_ENDPOINT = "https://huggingface.co"
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
#: Seconds the reachability check may take in all.
PROBE_TIMEOUT = 4.0

_cache: dict[str, str | None] = {}


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def offline_requested() -> str | None:
    """The variable that asks for offline mode, or None."""
    for var in OFFLINE_VARS:
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return var
    return None


def _probe(url: str, timeout: float) -> str | None:
    """None where ``url`` answers at all (any HTTP status counts), else why not."""
    result: dict[str, str | None] = {}

    def run() -> None:
        try:
            req = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "mgaudit-hub-check"})
            with urllib.request.urlopen(req, timeout=timeout):
                pass
            result["why"] = None
        except urllib.error.HTTPError:
            result["why"] = None  # it answered
        except Exception as exc:  # DNS, refused, timeout, TLS: all mean "not usable now"
            reason = getattr(exc, "reason", None) or exc
            result["why"] = " ".join(str(reason).split()) or type(exc).__name__

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        return f"no answer within {timeout:g} s"
    return result.get("why", "no answer")


def unavailable(timeout: float = PROBE_TIMEOUT) -> str | None:
    """Why the Hub cannot be used now (in words), or None where it answers. Checked once per process
    and endpoint."""
    var = offline_requested()
    if var:
        return f"{var} is set"
    url = endpoint()
    if url not in _cache:
        why = _probe(url, timeout)
        _cache[url] = None if why is None else f"the Hugging Face Hub ({url}) cannot be reached: {why}"
    return _cache[url]


@contextmanager
def local_only() -> Iterator[None]:
    """For the block, huggingface_hub, transformers and datasets read their local cache only: no
    request, so no retries."""
    patched: list[tuple[object, str, object]] = []

    def setattr_saved(obj: object, name: str, value: object) -> None:
        if hasattr(obj, name):
            patched.append((obj, name, getattr(obj, name)))
            setattr(obj, name, value)

    saved_env = {v: os.environ.get(v) for v in OFFLINE_VARS}
    for v in OFFLINE_VARS:
        os.environ[v] = "1"
    try:
        try:
            import huggingface_hub.constants as hc

            setattr_saved(hc, "HF_HUB_OFFLINE", True)
        except ImportError:
            pass
        try:
            import datasets.config as dc

            setattr_saved(dc, "HF_HUB_OFFLINE", True)
            setattr_saved(dc, "HF_DATASETS_OFFLINE", True)
        except ImportError:
            pass
        yield
    finally:
        for obj, name, value in reversed(patched):
            setattr(obj, name, value)
        for v, value in saved_env.items():
            if value is None:
                os.environ.pop(v, None)
            else:
                os.environ[v] = value
