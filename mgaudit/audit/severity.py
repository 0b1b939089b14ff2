"""The severity of a difference between a reference run and a candidate run.

Given a gate threshold tau (from ``calibrate``'s gate.json or given directly), a step where
the candidate took another token than the reference is

* **within noise** when the reference's top-1/top-2 margin at that step is below tau *and*
  the candidate took the reference's runner-up: batch-order rounding, which moves logits by
  less than the calibrated bound, can explain it;
* **anomalous** otherwise: the reference preferred its token by tau or more, or the
  candidate took a token the reference did not even rank second, or one run ended where the
  other went on. Rounding cannot explain that: another model or quantization, a broken
  deterministic mode, a bug.

Without a margin (a server that returned no logprobs, or one that sampled: its draws are unknown,
so a sampling margin cannot be computed) a difference is ``unknown``. Under mgaudit's own seeded
sampling the margin is the sampling margin, in logit units (:mod:`mgaudit.decoding.sampling`),
and the same tau applies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

from ..stats import proportion

WITHIN_NOISE = "within_noise"
ANOMALOUS = "anomalous"
UNKNOWN = "unknown"
#: Bin edges (logits) of the margin histogram at differences.
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

    def classify(self, reference_margin: float | None, reference_runner_up: int | None,
                 reference_token: int, candidate_token: int) -> tuple[str, str]:
        """(severity, reason) of a step where the two runs took different tokens."""
        if reference_token < 0 or candidate_token < 0:
            side = "reference" if reference_token < 0 else "candidate"
            return ANOMALOUS, f"the {side} run ended here while the other went on"
        if reference_margin is None or not math.isfinite(reference_margin):
            return UNKNOWN, "no reference margin (no logprobs, or sampled by a server whose draws are unknown)"
        if reference_margin >= self.tau:
            return ANOMALOUS, f"reference margin {reference_margin:.4g} >= tau {self.tau:.4g}"
        if reference_runner_up is not None and reference_runner_up >= 0 and candidate_token != reference_runner_up:
            return ANOMALOUS, "the candidate took a token the reference did not rank second"
        return WITHIN_NOISE, f"reference margin {reference_margin:.4g} < tau {self.tau:.4g}"

    def of_steps(self, reference, candidate, t: int) -> str:
        """The severity of step ``t`` of two step records (``formats.traces.SeverityFn``)."""
        ref_tok = reference.tokens[t] if t < len(reference.tokens) else -1
        cand_tok = candidate.tokens[t] if t < len(candidate.tokens) else -1
        margin = reference.top1[t] - reference.top2[t] if t < len(reference.tokens) else None
        runner = reference.runner_up[t] if t < len(reference.tokens) else None
        return self.classify(margin, runner, ref_tok, cand_tok)[0]


def summarize(differences: Iterable[dict[str, Any]], threshold: Threshold | None) -> dict[str, Any]:
    """Counts per severity with 95 % intervals, the histogram of reference margins at the
    differences, the worst cases (largest reference margin first) and where tau came from."""
    diffs = list(differences)
    counts = {WITHIN_NOISE: 0, ANOMALOUS: 0, UNKNOWN: 0, "unclassified": 0}
    for d in diffs:
        counts[d.get("severity") or "unclassified"] += 1
    classified = counts[WITHIN_NOISE] + counts[ANOMALOUS]
    margins = [d["reference_margin"] for d in diffs if d.get("reference_margin") is not None]
    hist = []
    for lo, hi in zip(HISTOGRAM_EDGES[:-1], HISTOGRAM_EDGES[1:]):
        hist.append({"from": lo, "to": None if math.isinf(hi) else hi,
                     "count": sum(1 for m in margins if lo <= m < hi)})
    worst = sorted(diffs, key=lambda d: (-(d.get("reference_margin") if d.get("reference_margin") is not None
                                           else math.inf), d["prompt_id"], d["step"]))[:WORST]
    return {
        "tau": None if threshold is None else threshold.tau,
        "tau_source": None if threshold is None else threshold.source,
        "differences": len(diffs),
        "counts": counts,
        "within_noise": proportion(counts[WITHIN_NOISE], classified),
        "anomalous": proportion(counts[ANOMALOUS], classified),
        "reference_margin_histogram": hist,
        "worst": worst,
    }
