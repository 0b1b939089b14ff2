"""A decoding policy and its contract: the names, the one validation, and what each policy runs.

Policies (see docs/design.md for why): ``none`` (what ``generate`` does with a batch),
``always`` (every step recomputed at batch size 1), ``gate`` (ragged fast path with margin
triggers and drift audits; ``fast_path="padded"``: the paper's design), ``invariant`` (the
ragged fast path, no runtime check). Contracts: ``solo`` (identical to the prompt alone with
the stock kernels) and ``batch-invariant`` (identical to the prompt alone through kernels
whose result does not depend on the batch).

:meth:`DecodePolicy.validate` is the one place a policy's values are checked; its messages
name the parameters in backquotes (``threshold``), never a command-line flag.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError

#: Policies that claim exactness, and every policy.
EXACT = ("always", "gate", "invariant")
POLICIES = ("none",) + EXACT
FAST_PATHS = ("ragged", "padded")
CONTRACTS = ("solo", "batch-invariant")
#: Default audit interval: every row is checked at batch size 1 at least every K steps.
AUDIT_EVERY = 16


@dataclass
class DecodePolicy:
    name: str = "gate"
    threshold: float | None = None  # gate: verify when batched_margin < threshold
    fast_path: str = "ragged"  # gate only: ragged (exact design) or padded (paper's design)
    max_rows: int | None = None  # cap every GEMM on the ragged path at this many rows; None = the probe's plan
    contract: str = "solo"  # solo | batch-invariant
    audit_every: int | None = AUDIT_EVERY  # gate on the ragged path: check each row at least every K steps

    def validate(self, batch_size: int | None = None) -> None:
        """Raise :class:`~mgaudit.errors.UsageError` on a value no decode can run with
        (``batch_size`` too, where given)."""
        _one_of("policy", self.name, POLICIES)
        _one_of("fast_path", self.fast_path, FAST_PATHS)
        _one_of("contract", self.contract, CONTRACTS)
        if batch_size is not None and (isinstance(batch_size, bool) or batch_size < 1):
            raise UsageError(f"`batch_size` {batch_size} must be at least 1")
        # values given but out of range first, then what is missing
        if self.threshold is not None and not self.threshold >= 0:
            raise UsageError(f"`threshold` {self.threshold} must be >= 0")
        for name, value in (("max_rows", self.max_rows), ("audit_every", self.audit_every)):
            if value is not None and value < 1:
                raise UsageError(f"`{name}` {value} must be at least 1")
        if self.name == "gate" and self.threshold is None:
            raise UsageError("`policy` gate needs a `threshold`", hint="give a gate file or a threshold")
        if self.contract == "batch-invariant" and not self.ragged and self.name != "none":
            raise UsageError(f"`policy` {self.name} has no batch-invariant form",
                             hint="use invariant or gate (ragged fast path) under that `contract`")

    @property
    def solo_prefill(self) -> bool:
        return self.name in ("always", "invariant") or (self.name == "gate" and self.fast_path == "ragged")

    @property
    def ragged(self) -> bool:
        return self.name == "invariant" or (self.name == "gate" and self.fast_path == "ragged")

    @property
    def audits(self) -> bool:
        """Whether checks are bitwise drift audits with rollback (the ragged gate)."""
        return self.name == "gate" and self.fast_path == "ragged"

    @property
    def checks(self) -> bool:
        """Whether steps are recomputed at batch size 1 at all (always, gate)."""
        return self.name in ("always", "gate")

    def verifies(self, margin: float) -> bool:
        if self.name == "always":
            return True
        if self.name == "gate":
            return margin < self.threshold
        return False


def _one_of(param: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UsageError(f"`{param}` {value!r} is not one of {', '.join(allowed)}")
