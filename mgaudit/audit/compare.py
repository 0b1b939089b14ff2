"""A reference run against a candidate run: per-sequence records and every difference.

* :func:`sequence_record`: free-running: identical or not, where the sequences part, both
  tokens and both margins there, the severity, and both full token lists (a failure can be
  debugged from the report alone);
* :func:`forced_flips`: teacher-forced (the candidate scored on the reference's prefix):
  every step whose token differs, each one event, with both margins and a severity.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from ..formats.traces import first_divergence
from .severity import Threshold
from .steps import Request, Steps

#: ``text(steps, t)``: the text of step ``t``'s token (None past the end).
TextFn = Callable[[Steps, int], "str | None"]


def token_text(tokenizer: Any) -> TextFn:
    """Token text from what the server sent for the token (its ``pieces``), else the tokenizer."""
    def text(steps: Steps, t: int) -> str | None:
        if t >= len(steps.tokens):
            return None
        pieces = steps.meta.get("pieces")
        if pieces is not None and t < len(pieces):
            return pieces[t]
        tok = steps.tokens[t]
        if tokenizer is not None and 0 <= tok < len(tokenizer):
            return tokenizer.decode([tok])
        return None

    return text


def difference(req: Request, reference: Steps, candidate: Steps, t: int, kind: str,
               threshold: Threshold | None, text: TextFn) -> dict[str, Any]:
    """One step where the candidate's token differs from the reference's."""
    ref_tok = reference.tokens[t] if t < len(reference) else -1
    cand_tok = candidate.tokens[t] if t < len(candidate) else -1
    gap, exact = reference.gap(t, cand_tok) if cand_tok >= 0 else (None, False)
    rec: dict[str, Any] = {
        "prompt_id": req.id, "step": t, "kind": kind,
        "reference_token": ref_tok, "candidate_token": cand_tok,
        "reference_text": text(reference, t), "candidate_text": text(candidate, t),
        "reference_margin": reference.margin(t), "candidate_margin": candidate.margin(t),
        "reference_runner_up": reference.runner_up[t] if t < len(reference) else None,
        # how far below its own token the reference put the candidate's (exact, or a lower bound)
        "reference_gap": gap, "reference_gap_exact": exact,
    }
    if threshold is not None:
        rec["severity"], rec["reason"], _ = threshold.classify(reference, t, cand_tok)
    return rec


def sequence_record(req: Request, reference: Steps, candidate: Steps, threshold: Threshold | None,
                    text: TextFn) -> dict[str, Any]:
    """The free-running comparison of one sequence (see the module doc)."""
    first = first_divergence(reference.tokens, candidate.tokens)
    rec: dict[str, Any] = {
        "prompt_id": req.id,
        "identical": first is None,
        "steps": len(candidate),
        "reference_steps": len(reference),
        "first_divergence": first,
        "reference_tokens": list(reference.tokens),
        "candidate_tokens": list(candidate.tokens),
    }
    for key in ("triggers", "audits", "repairs", "drift_events", "finish_reason", "prompt_tokens", "attempts"):
        if key in candidate.meta:
            rec[f"candidate_{key}" if key in ("finish_reason", "prompt_tokens", "attempts") else key] = \
                candidate.meta[key]
    for key in ("finish_reason", "prompt_tokens"):
        if key in reference.meta:
            rec[f"reference_{key}"] = reference.meta[key]
    if first is not None:
        diff = difference(req, reference, candidate, first, "first_divergence", threshold, text)
        rec["divergence"] = {k: v for k, v in diff.items() if k not in ("prompt_id", "step", "kind")}
        verified = candidate.meta.get("verified")
        if verified is not None:
            rec["divergence"]["verified"] = verified[first] if first < len(verified) else None
        s, c = reference.tokens, candidate.tokens
        if text is not None:
            rec["divergence"]["reference_context"] = "".join(
                text(reference, i) or "" for i in range(max(0, first - 8), min(len(s), first + 1)))
            rec["divergence"]["candidate_context"] = "".join(
                text(candidate, i) or "" for i in range(max(0, first - 8), min(len(c), first + 1)))
    return rec


def forced_flips(req: Request, reference: Steps, forced: Steps, threshold: Threshold | None,
                 text: TextFn) -> list[dict[str, Any]]:
    """Every teacher-forced step whose token differs from the reference's."""
    return [difference(req, reference, forced, t, "flip", threshold, text)
            for t in range(min(len(forced), len(reference))) if forced.tokens[t] != reference.tokens[t]]


def prompt_tokens_differ(records: Sequence[dict[str, Any]]) -> list[str]:
    """Prompts whose token counts differ between the two sides (a server that tokenized the text
    itself): the comparison does not start from the same ids there."""
    return [r["prompt_id"] for r in records
            if r.get("candidate_prompt_tokens") is not None and r.get("reference_prompt_tokens") is not None
            and r["candidate_prompt_tokens"] != r["reference_prompt_tokens"]]
