"""The options every audit job shares (``scan`` and ``verify``): which backends, the threshold
that classifies differences, and the server client's settings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..models import ModelOptions
from .severity import Threshold

FAIL_ON = ("any", "anomalous")


@dataclass(kw_only=True)
class AuditOptions(ModelOptions):
    """``endpoint``: the candidate is this server (else the local model). ``reference``: what the
    candidate is compared with: None (the candidate's own backend, each prompt alone), ``"local"``
    (the local model alone) or a server URL (that server, each prompt alone). ``tokenizer``: a model
    spec whose tokenizer turns prompts into the token ids sent to servers (the local model's where
    one is loaded). ``gate``/``threshold``: tau for the severity of differences. ``temperature``,
    ``top_p``, ``top_k``, ``min_p``, ``sample_seed``: how tokens are chosen (temperature 0: greedy;
    above, seeded sampling, each prompt drawing from a stream derived from ``sample_seed`` and its
    id, the same for the reference and the candidate: :mod:`mgaudit.decoding.sampling`)."""

    endpoint: str | None = None
    reference: str | None = None
    tokenizer: str | None = None
    gate: Path | None = None
    threshold: float | None = None
    timeout: float = 120.0
    retries: int = 3
    tokens_only: bool = False
    engine_note: str | None = None
    reference_cache: bool = True
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float = 0.0
    sample_seed: int = 0

    def sampling(self):
        """The :class:`~mgaudit.decoding.sampling.Sampling` of the job."""
        from ..decoding.sampling import Sampling

        return Sampling(self.temperature, self.top_p, self.top_k, self.min_p, self.sample_seed)

    def validate_audit(self) -> None:
        from ..endpoint.client import normalize_base_url

        self.sampling().validate()
        if self.endpoint is not None:
            normalize_base_url(self.endpoint)
        if self.reference not in (None, "local"):
            try:
                normalize_base_url(self.reference)
                ok = "://" in self.reference or ":" in self.reference
            except UsageError:
                ok = False
            if not ok:
                raise UsageError(f"`reference` {self.reference!r} is neither local nor a server URL",
                                 hint="give local or a base URL such as http://127.0.0.1:8080/v1")
        if self.endpoint is None and self.reference == "local":
            self.reference = None  # the local model alone is the default reference of the local model
        if self.endpoint is None and (self.tokens_only or self.engine_note):
            raise UsageError("`tokens_only` and `engine_note` apply to a server", hint="give `endpoint` too")
        if self.gate is not None and self.threshold is not None:
            raise UsageError("`gate` and `threshold` exclude each other")
        if self.threshold is not None and not self.threshold >= 0:
            raise UsageError(f"`threshold` {self.threshold} must be >= 0")
        if not self.timeout > 0:
            raise UsageError(f"`timeout` {self.timeout} must be > 0")
        if self.retries < 0:
            raise UsageError(f"`retries` {self.retries} must be >= 0")

    def threshold_of(self) -> Threshold | None:
        """tau and where it came from (a gate file's traces and stack, or the value given)."""
        from ..formats.gate import float32_decimal, float32_value, load_gate

        if self.gate is not None:
            gate = load_gate(Path(self.gate))
            prov = gate.get("provenance") or {}
            source: dict[str, Any] = {
                "from": "gate", "path": str(self.gate), "method": gate.get("method"),
                "traces": [t.get("path") for t in gate.get("traces") or []],
                "model": (prov.get("model") or {}).get("name"),
                "stack": {k: (prov.get("model") or {}).get(k) for k in ("dtype", "device", "attn_implementation",
                                                                        "engine")},
                "calibrated": gate.get("created"),
            }
            return Threshold(gate["threshold"], source, gate)
        if self.threshold is not None:
            tau = float32_value(self.threshold)
            return Threshold(tau, {"from": "threshold", "value": float32_decimal(tau)})
        return None
