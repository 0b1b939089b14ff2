"""What this machine is, read in one place: the CPU (vendor, family/model, the ISA extensions that
select the bf16 kernels), the GPU (name, compute capability) and the thread counts.

The kernels whose results mgaudit audits differ between machines that ``lscpu`` names alike: it
prints "AMD EPYC" for Zen 3 (AVX2 only), Zen 4 and Zen 5 (AVX512-BF16, no AMX), while an Intel
Xeon with AMX routes bf16 GEMMs through its tile unit. So a machine is told apart by its flags
and its family/model, never by its name alone. :func:`identity` is the JSON-able record (used in
the probe's cache key, in every artifact's provenance and in the server build), :func:`describe`
the one line ``--version`` prints, :func:`cpu_flags` every flag the CPU reports (the server build
key hashes them: a native build is valid only for the same ISA).
"""

from __future__ import annotations

import functools
import os
import platform
from typing import Any

#: ISA labels, strongest first: the first whose flag the CPU has names its bf16 kernel family.
ISA_LABELS = (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16"), ("avx512f", "AVX512"), ("avx2", "AVX2"))
#: Flag prefixes that select or shape the CPU kernels (kept in :func:`identity`).
KERNEL_FLAG_PREFIXES = ("amx", "avx512", "avx2", "avx_vnni", "fma", "f16c", "asimd", "sve", "bf16", "i8mm")
VENDORS = {"GenuineIntel": "Intel", "AuthenticAMD": "AMD"}


def parse_cpuinfo(text: str) -> dict[str, str]:
    """The first processor block of a ``/proc/cpuinfo`` text, as ``{key: value}``."""
    block: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if block:
                break
            continue
        key, _, value = line.partition(":")
        block.setdefault(key.strip(), value.strip())
    return block


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> dict[str, str]:
    """This machine's first processor block (empty where there is no ``/proc/cpuinfo``)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            return parse_cpuinfo(fh.read())
    except OSError:
        return {}


def cpu_flags(info: dict[str, str] | None = None) -> list[str]:
    """Every ISA flag the CPU reports (``flags`` on x86, ``Features`` on ARM), sorted."""
    info = _cpuinfo() if info is None else info
    return sorted(set((info.get("flags") or info.get("Features") or "").split()))


def _int(text: str | None) -> int | None:
    try:
        return int(text, 0) if text else None
    except ValueError:
        return None


def isa_label(flags: list[str] | set[str]) -> str:
    """The strongest bf16-relevant ISA extension: "AMX", "AVX512-BF16", "AVX512", "AVX2", or the
    architecture's name where none of these is present."""
    have = set(flags)
    return next((label for flag, label in ISA_LABELS if flag in have), platform.machine() or "unknown")


def cpu_identity(info: dict[str, str] | None = None) -> dict[str, Any]:
    """The CPU as the kernels see it: vendor, model name, family and model, ISA label and flags
    (of this machine, or of a parsed ``/proc/cpuinfo`` block ``info``)."""
    info = _cpuinfo() if info is None else info
    flags = cpu_flags(info)
    vendor = info.get("vendor_id") or info.get("CPU implementer") or platform.processor() or None
    return {
        "cpu_vendor": VENDORS.get(vendor or "", vendor),
        "cpu_model_name": info.get("model name") or platform.processor() or platform.machine() or "unknown",
        "cpu_family": _int(info.get("cpu family")),
        "cpu_model": _int(info.get("model") if "model" in info else info.get("CPU part")),
        "arch": platform.machine(),
        "isa": isa_label(flags),
        "isa_flags": [f for f in flags if f.startswith(KERNEL_FLAG_PREFIXES)],
    }


def gpu_identity(device: Any = None) -> dict[str, Any] | None:
    """Name, compute capability and count of the CUDA device (``device``, or the first); None
    where CUDA is absent."""
    import torch

    if not torch.cuda.is_available():
        return None
    dev = torch.device(device) if device is not None else torch.device("cuda", 0)
    if dev.type != "cuda":
        dev = torch.device("cuda", 0)
    major, minor = torch.cuda.get_device_capability(dev)
    return {"gpu": torch.cuda.get_device_name(dev), "gpu_capability": f"{major}.{minor}",
            "gpu_count": torch.cuda.device_count()}


def identity() -> dict[str, Any]:
    """This machine, JSON-able: the CPU (:func:`cpu_identity`), logical cores, torch threads and,
    where CUDA is present, the GPU (:func:`gpu_identity`; else ``gpu`` is None)."""
    import torch

    return {**cpu_identity(), "logical_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            **(gpu_identity() or {"gpu": None})}


def kernel_identity(device: Any) -> dict[str, Any]:
    """What selects the kernels that run on ``device`` (a torch device or its name): the GPU's
    name and capability for CUDA, else the CPU without its core count (the probe's cache key)."""
    kind = str(device).split(":")[0]
    if kind == "cuda":
        gpu = gpu_identity(device)
        if gpu is not None:
            return {"gpu": gpu["gpu"], "gpu_capability": gpu["gpu_capability"]}
    return cpu_identity()


def describe(ident: dict[str, Any] | None = None) -> str:
    """One line, e.g. ``AMD EPYC (family 26, model 2): AVX512-BF16, no AMX, 2 cores``."""
    d = ident or identity()
    where = ", ".join(f"{k} {d[f'cpu_{k}']}" for k in ("family", "model") if d.get(f"cpu_{k}") is not None)
    isa = d["isa"]
    flags = set(d.get("isa_flags") or ())
    if isa == "AMX":
        isa += ", AVX512-BF16" if "avx512_bf16" in flags else ""
    elif isa in ("AVX512-BF16", "AVX512"):
        isa += ", no AMX"
    elif isa == "AVX2":
        isa += ", no AVX512"
    line = f"{d['cpu_model_name']}{f' ({where})' if where else ''}: {isa}, {d['logical_cores']} cores"
    if d.get("gpu"):
        line += f"; GPU {d['gpu']} (compute capability {d['gpu_capability']})"
    return line
