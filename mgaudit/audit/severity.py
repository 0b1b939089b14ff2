"""The severity of a difference between a reference run and a candidate run.

Given a gate threshold tau (from ``calibrate``'s gate.json or given directly), a step where
the candidate took another token than the reference is

* **within noise** when the reference put the candidate's token less than tau below its own
  (its *gap*: the top-1/top-2 margin where the candidate took the runner-up): batch-order
  rounding, which moves logits by less than the calibrated bound, can explain it;
* **anomalous** when that gap is tau or more (also where the candidate's token is not among the
  tokens the reference listed and the last of them is already tau below), or where one run
  ended and the other went on. Rounding cannot explain that: another model or quantization, a
  broken deterministic mode, a bug;
* **unknown** where the gap cannot be bounded: no logprobs (a tokens-only server), or the
  candidate's token is not among the reference's listed tokens while those lie within tau.

Under mgaudit's own seeded sampling the gap is measured in the sampling rule's perturbed scores
(logit units, :mod:`mgaudit.decoding.sampling`): the sampling margin where the candidate took the
runner-up, and the same tau applies. A server that sampled gives no margin (its draws are
unknown): its differences are ``unknown``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

from ..stats import proportion

WITHIN_NOISE = "within_noise"
ANOMALOUS = "anomalous"
UNKNOWN = "unknown"
#: Bin edges (logits) of the histogram of the reference's gaps at differences.
HISTOGRAM_EDGES = (0.0, 0.0625, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0, math.inf)
#: Worst cases listed in a summary.
WORST = 10


@dataclass(frozen=True)
class Threshold:
    """tau (a float32 number) and where it came from (a gate file and the traces and stack it was
    fitted on, or a value given directly)."""

    tau: float
    source: dict[str, Any] = field(default_factory=dict)
    gate: dict[str, Any] | None = field(default=None, repr=False, compare=False)  # the gate document, if any

    def classify(self, reference, t: int, candidate_token: int) -> tuple[str, str, float | None]:
        """(severity, reason, gap) of step ``t``, where the candidate took ``candidate_token`` and the
        reference (a :class:`~mgaudit.audit.steps.Steps`) another token."""
        ref_token = reference.tokens[t] if t < len(reference.tokens) else -1
        if ref_token < 0 or candidate_token < 0:
            side = "reference" if ref_token < 0 else "candidate"
            return ANOMALOUS, f"the {side} run ended here while the other went on", None
        gap, exact = reference.gap(t, candidate_token)
        if gap is None or not math.isfinite(gap):
            return UNKNOWN, "no reference margin (no logprobs, or sampled by a server whose draws are unknown)", None
        if exact:
            if gap < self.tau:
                return WITHIN_NOISE, f"reference gap {gap:.4g} < tau {self.tau:.4g}", gap
            return ANOMALOUS, f"reference gap {gap:.4g} >= tau {self.tau:.4g}", gap
        if gap >= self.tau:
            return ANOMALOUS, f"not among the reference's listed tokens, at least {gap:.4g} >= tau below", gap
        return UNKNOWN, "not among the reference's listed tokens, which lie within tau", gap

    def of_steps(self, reference, candidate, t: int) -> str:
        """The severity of step ``t`` of two step records (``formats.traces.SeverityFn``)."""
        cand_tok = candidate.tokens[t] if t < len(candidate.tokens) else -1
        return self.classify(reference, t, cand_tok)[0]


def _gap(d: dict[str, Any]) -> float | None:
    g = d.get("reference_gap", d.get("reference_margin"))
    return g if g is not None and math.isfinite(g) else None


def summarize(differences: Iterable[dict[str, Any]], threshold: Threshold | None) -> dict[str, Any]:
    """Counts per severity with 95 % intervals, the histogram of the reference's gaps at the
    differences (how far below its own token it put the candidate's), the worst cases (largest
    gap first) and where tau came from."""
    diffs = list(differences)
    counts = {WITHIN_NOISE: 0, ANOMALOUS: 0, UNKNOWN: 0, "unclassified": 0}
    for d in diffs:
        counts[d.get("severity") or "unclassified"] += 1
    classified = counts[WITHIN_NOISE] + counts[ANOMALOUS]
    gaps = [g for g in map(_gap, diffs) if g is not None]
    hist = []
    for lo, hi in zip(HISTOGRAM_EDGES[:-1], HISTOGRAM_EDGES[1:]):
        hist.append({"from": lo, "to": None if math.isinf(hi) else hi, "count": sum(1 for g in gaps if lo <= g < hi)})
    worst = sorted(diffs, key=lambda d: (-(_gap(d) if _gap(d) is not None else math.inf), d["prompt_id"], d["step"]))
    return {
        "tau": None if threshold is None else threshold.tau,
        "tau_source": None if threshold is None else threshold.source,
        "differences": len(diffs),
        "counts": counts,
        "within_noise": proportion(counts[WITHIN_NOISE], classified),
        "anomalous": proportion(counts[ANOMALOUS], classified),
        "reference_gap_histogram": hist,
        "worst": worst[:WORST],
    }
