"""mgaudit: audit and fix batch-dependent nondeterminism in LLM decoding, greedy and seeded sampling.

The public API is importable from here; names load on first use, so ``import mgaudit``
(and the CLI's start) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> module that defines it
_EXPORTS = {
    # models and prompts
    "load_model": "mgaudit.models", "LoadedModel": "mgaudit.models", "ModelOptions": "mgaudit.models",
    "load_prompts": "mgaudit.prompts", "encode_prompt": "mgaudit.prompts", "PromptSet": "mgaudit.prompts",
    # decoding
    "DecodePolicy": "mgaudit.decoding.policy", "DecodeOutput": "mgaudit.decoding.results",
    "SequenceResult": "mgaudit.decoding.results", "DriftEvent": "mgaudit.decoding.results",
    "decode": "mgaudit.decoding.policies", "reference_decode": "mgaudit.decoding.policies",
    "solo_decode": "mgaudit.decoding.stock", "padded_decode": "mgaudit.decoding.stock", "RowTrace": "mgaudit.decoding.stock",
    "greedy": "mgaudit.decoding.loop", "Step": "mgaudit.decoding.loop",
    "Sampling": "mgaudit.decoding.sampling", "SampleRule": "mgaudit.decoding.sampling",
    "probe": "mgaudit.decoding.invariance", "ProbeReport": "mgaudit.decoding.invariance",
    # the jobs
    "scan": "mgaudit.scan", "ScanConfig": "mgaudit.scan", "ScanResult": "mgaudit.scan",
    "calibrate": "mgaudit.calibrate", "CalibrateConfig": "mgaudit.calibrate",
    "CalibrationResult": "mgaudit.calibrate", "load_gate": "mgaudit.formats.gate",
    "verify": "mgaudit.verify", "VerifyConfig": "mgaudit.verify",
    "run_demo": "mgaudit.demo", "DemoConfig": "mgaudit.demo",
    # errors
    "MgauditError": "mgaudit.errors", "UsageError": "mgaudit.errors", "InputError": "mgaudit.errors",
    "OutputError": "mgaudit.errors", "NoFlipsError": "mgaudit.errors", "TraceError": "mgaudit.errors",
    "GateError": "mgaudit.errors", "ModelError": "mgaudit.errors", "PromptError": "mgaudit.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mgaudit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
