"""The gate file (gate.json): its format, how its numbers are written, reading it with checks, and
writing it atomically. :mod:`mgaudit.calibrate` fills it; :mod:`mgaudit.verify` reads it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import GateError, json_error_text
from .files import atomic_write_json

GATE_FORMAT = "mgaudit.gate"
GATE_VERSION = 1
METRIC = "batched_margin"
RULE = "verify when batched_margin < threshold"


def write_gate(path: Path, document: dict[str, Any]) -> None:
    """Write a gate document (made by ``CalibrationResult.to_gate_json``) atomically."""
    if document.get("format") != GATE_FORMAT or document.get("version") != GATE_VERSION:
        raise ValueError("not a gate document of this version")
    atomic_write_json(Path(path), document)


def load_gate(path: Path) -> dict[str, Any]:
    """Read and check a gate.json; GateError (one line) for anything unusable."""
    path = Path(path)
    hint = "fit one with calibrate (its `out` file)"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GateError(f"{path}: no such gate file", hint=hint) from None
    except IsADirectoryError:
        raise GateError(f"{path}: is a directory, not a gate file", hint=hint) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise GateError(f"{path}: cannot read gate file ({exc.__class__.__name__})") from None
    try:
        gate = json.loads(text)
    except json.JSONDecodeError as exc:
        raise GateError(f"{path}: not valid JSON ({json_error_text(exc)})", hint=hint) from None
    if not isinstance(gate, dict):
        raise GateError(f"{path}: a gate file holds a JSON object, not {type(gate).__name__}", hint=hint)
    if gate.get("format") != GATE_FORMAT:
        raise GateError(f"{path}: not an mgaudit gate file (format {gate.get('format')!r}, expected {GATE_FORMAT!r})",
                        hint=hint)
    if gate.get("version") != GATE_VERSION:
        raise GateError(f"{path}: unsupported gate version {gate.get('version')!r} (this mgaudit reads {GATE_VERSION})",
                        hint="recalibrate with this mgaudit")
    if "threshold" not in gate:
        raise GateError(f"{path}: no threshold", hint=hint)
    tau = gate["threshold"]
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau):
        raise GateError(f"{path}: threshold must be a finite number, not {tau!r}", hint=hint)
    if tau < 0:
        raise GateError(f"{path}: threshold must be >= 0, not {tau}", hint=hint)
    if gate.get("metric", METRIC) != METRIC:
        raise GateError(f"{path}: unsupported metric {gate.get('metric')!r} (expected {METRIC!r})")
    gate["threshold"] = float32_value(tau)  # the gate compares float32 margins with a float32 tau
    return gate



def float32_value(x: float) -> float:
    """The float32 nearest ``x``, as a Python float (thresholds are float32 numbers, like margins)."""
    return float(np.float32(x))


def float32_text(x: float) -> str:
    """The shortest decimal that reads back as the same float32: 0.31250003, 0.0625, 1e-45."""
    f = np.float32(x)
    if not np.isfinite(f):
        return str(float(f))
    if f == 0 or 1e-4 <= abs(f) < 1e16:
        return np.format_float_positional(f, unique=True, trim="-")
    return np.format_float_scientific(f, unique=True, trim="-").replace("e+", "e")


def float32_decimal(x: float) -> float:
    """``float(float32_text(x))``: the value JSON should carry so it prints as that short decimal."""
    return float(float32_text(x))


def float32_up(x: float) -> float:
    """The smallest float32 >= ``x`` (a threshold rounded to float32 never loses coverage)."""
    f = np.float32(x)
    if float(f) < x:
        f = np.nextafter(f, np.float32(np.inf))
    return float(f)
