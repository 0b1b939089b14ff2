"""Helpers shared by the benchmark scripts (timing, environment line)."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def environment() -> dict[str, Any]:
    import torch
    import transformers

    import mgaudit
    from mgaudit.machine import describe, identity

    return {
        "mgaudit": mgaudit.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "cpu": describe(),
        "machine": identity(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def median(xs):
    return statistics.median(xs) if xs else float("nan")
