"""How a run happens: the conditions a candidate is decoded under.

=============  ==========================================================================
``alone``      the prompt by itself: batch size 1, nothing else in flight (the reference
               always runs so; a candidate of another backend too)
``padded``     local: inside a left-padded batch of ``level`` rows, as ``generate`` runs it
``policy``     local: under a decode policy (none, always, gate, invariant) at batch size
               ``level``, for its contract
``in-flight``  a server: the request sent together with ``level - 1`` others
``staggered``  a server: ``level`` requests sent one after another, ``spacing`` seconds apart,
               so each joins a batch already decoding (as continuous batching admits them)
``warm-cache`` a server: the request alone, sent a second time so its prompt is cached
=============  ==========================================================================

``round`` numbers repetitions of the same condition (a server's continuous batching is a
sample of timings; one round is one sample).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

KINDS = ("alone", "padded", "policy", "in-flight", "staggered", "warm-cache")
#: Kinds the local model runs, and kinds a server runs (both run ``alone``).
LOCAL_KINDS = ("alone", "padded", "policy")
REMOTE_KINDS = ("alone", "in-flight", "staggered", "warm-cache")


@dataclass(frozen=True)
class Condition:
    kind: str
    level: int = 1  # rows decoded together, or requests in flight
    round: int = 0
    policy: Any = None  # the DecodePolicy of kind "policy"
    spacing: float | None = None  # kind "staggered": seconds between one request's arrival and the next

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
        if self.kind == "staggered":
            return f"{self.level} requests arriving {1000 * (self.spacing or 0):.0f} ms apart"
        return "alone, prompt cache warm"

    def key(self) -> dict[str, Any]:
        """JSON form for provenance and the scan manifest."""
        out: dict[str, Any] = {"kind": self.kind, "level": self.level, "round": self.round}
        if self.policy is not None:
            out["policy"] = {k: getattr(self.policy, k, None) for k in
                             ("name", "threshold", "fast_path", "contract", "audit_every")}
        if self.spacing is not None:
            out["spacing"] = self.spacing
        return out


def batch_groups(n: int, batch_size: int, seed: int) -> list[tuple[list[int], int]]:
    """Which of ``n`` prompts run together: groups of ``batch_size`` positions of a seeded permutation,
    as (members, owned). The first ``owned`` members are recorded; a short last group is filled up
    with prompts from the start of the permutation (a group larger than the set repeats prompts)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    groups = []
    for start in range(0, n, batch_size):
        members = order[start:start + batch_size]
        owned = len(members)
        k = 0
        while len(members) < batch_size:  # fill a short batch with other prompts of the set
            members.append(order[k % n])
            k += 1
        groups.append((members, owned))
    return groups
