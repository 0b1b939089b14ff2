"""What a decode under a policy returns: per prompt a :class:`SequenceResult` (tokens, the fast
path's logits, checks, repairs, drift events), and for the run a :class:`DecodeOutput` (the plan,
its changes, the probe's evidence)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class DriftEvent:
    """A check found the fast path's logits or K/V column different from the batch-1 computation."""

    row: int  # index of the sequence in the decoded prompt list
    step: int
    what: str  # "logits", "kv" or "logits+kv"
    replayed_from: int  # last checked step the row was restored to
    replayed_steps: int
    op: str | None = None  # the op found to differ (None: not attributed)
    rows: int | None = None  # rows that op ran when it differed
    lowered_to: str | None = None  # how that op runs from then on
    token_changed: bool = False


@dataclass
class SequenceResult:
    """One prompt's output under a policy. ``tokens``: what the policy chose at each step (after
    any check); ``top1``, ``top2``, ``runner_up``: the fast path's (batched) logits and runner-up
    at that step, what the gate saw, also where a check or a replay changed the token."""

    tokens: list[int] = field(default_factory=list)
    top1: list[float] = field(default_factory=list)
    top2: list[float] = field(default_factory=list)
    runner_up: list[int] = field(default_factory=list)
    verified: list[bool] = field(default_factory=list)  # checked at batch size 1 at this step
    repaired: list[bool] = field(default_factory=list)  # token differs from the fast path's
    audited: list[bool] = field(default_factory=list)  # checked because an audit was due (not the margin)
    drift: list[DriftEvent] = field(default_factory=list)
    logits: list[torch.Tensor] | None = None  # per step, when asked (keep_logits)
    kind: list[str | None] | None = None  # sampled: which margin is the smaller per step (mgaudit.decoding.sampling)

    @property
    def margins(self) -> list[float]:
        """The fast path's top-1 minus top-2 logit per step (what the gate compares with tau)."""
        return [a - b for a, b in zip(self.top1, self.top2)]

    @property
    def triggers(self) -> int:
        return sum(1 for v, a in zip(self.verified, self.audited) if v and not a)

    @property
    def audits(self) -> int:
        return sum(self.audited)

    @property
    def repairs(self) -> int:
        return sum(self.repaired)

    def _truncate(self, n: int) -> None:
        for lst in (self.tokens, self.top1, self.top2, self.runner_up, self.verified, self.repaired, self.audited,
                    self.kind if self.kind is not None else []):
            del lst[n:]
        if self.logits is not None:
            del self.logits[n:]


@dataclass
class DecodeOutput:
    sequences: list[SequenceResult]
    seconds: float
    max_rows: int | None  # smallest GEMM chunk in the plan (None: no ragged path)
    plan: dict[str, str] = field(default_factory=dict)  # ops not run as one batched product, and how
    lowered: list[dict[str, Any]] = field(default_factory=list)  # plan changes made after drift
    probe: dict[str, Any] | None = None  # the probe's evidence (ragged path)
    contract: str = "solo"
    audit_every: int | None = None
    sampling: dict[str, Any] | None = None  # seeded sampling: its settings and each prompt's draw seed

    @property
    def drift_events(self) -> list[DriftEvent]:
        return [e for s in self.sequences for e in s.drift]
