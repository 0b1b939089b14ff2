"""How a run happens: the conditions a candidate is decoded under.

=============  ==========================================================================
``alone``      the prompt by itself: batch size 1, nothing else in flight (the reference
               always runs so; a candidate of another backend too)
``padded``     local: inside a left-padded batch of ``level`` rows, as ``generate`` runs it
``policy``     local: under a decode policy (none, always, gate, invariant) at batch size
               ``level``, for its contract
``in-flight``  a server: the request sent together with ``level - 1`` others
``warm-cache`` a server: the request alone, sent a second time so its prompt is cached
=============  ==========================================================================

``round`` numbers repetitions of the same condition (a server's continuous batching is a
sample of timings; one round is one sample).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

KINDS = ("alone", "padded", "policy", "in-flight", "warm-cache")
#: Kinds the local model runs, and kinds a server runs (both run ``alone``).
LOCAL_KINDS = ("alone", "padded", "policy")
REMOTE_KINDS = ("alone", "in-flight", "warm-cache")


@dataclass(frozen=True)
class Condition:
    kind: str
    level: int = 1  # rows decoded together, or requests in flight
    round: int = 0
    policy: Any = None  # the DecodePolicy of kind "policy"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown condition {self.kind!r}")

    def describe(self) -> str:
        if self.kind == "alone":
            return "alone"
        if self.kind == "padded":
            return f"in a padded batch of {self.level}"
        if self.kind == "policy":
            name = getattr(self.policy, "name", "?")
            return f"policy {name} at batch size {self.level}"
        if self.kind == "in-flight":
            return f"with {self.level - 1} other request{'s' if self.level != 2 else ''} in flight"
        return "alone, prompt cache warm"

    def key(self) -> dict[str, Any]:
        """JSON form for provenance and the scan manifest."""
        out: dict[str, Any] = {"kind": self.kind, "level": self.level, "round": self.round}
        if self.policy is not None:
            out["policy"] = {k: getattr(self.policy, k, None) for k in
                             ("name", "threshold", "fast_path", "contract", "audit_every")}
        return out
