"""What each candidate unit of a trace directory found, read back from its file: per recorded
sequence, identical to its reference or where it parted, its teacher-forced flips and the margins
there; per unit, its timing, requests and retries. Rows of a sweep's card are pooled from these
(:func:`level_row`), and so is its onset (:func:`onset`): the first level where anything differs.

Everything here reads what the unit files hold, never what a run kept in memory: a resumed
sweep decides and reports exactly as an uninterrupted one.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..stats import interval95, proportion

#: Columns a unit file is read with.
COLUMNS = ["prompt_id", "mode", "step", "flip", "first_divergence", "solo_margin", "batched_margin", "severity",
           "prompt_len"]


@dataclass
class Sequence:
    """One recorded sequence of a unit: free-running identical or not, and its teacher-forced steps."""

    prompt_id: str
    prompt_len: int
    identical: bool
    first_divergence: int | None
    steps: int  # free-running steps compared
    forced_steps: int = 0
    flip_steps: list[int] = field(default_factory=list)  # teacher-forced flips, by step
    candidate_margins: list[float] = field(default_factory=list)  # at those flips
    reference_margins: list[float] = field(default_factory=list)
    severities: list[str] = field(default_factory=list)  # at divergences, where a threshold was given


@dataclass
class UnitOutcome:
    """One candidate unit file: what ran (condition, level, round, variant) and what it found."""

    name: str
    condition: str
    level: int
    round: int
    variant: str
    spacing: float | None
    seconds: float
    requests: list[dict[str, Any]]  # every member sent (a short group's fill-up too): tokens, attempts...
    sequences: list[Sequence]


def read_units(folder: Path) -> list[UnitOutcome]:
    """Every candidate unit file of a trace directory, in name order."""
    from ..formats.traces import read_provenance, trace_files

    out = []
    for f in trace_files(folder):
        unit = read_provenance(f).get("unit") or {}
        if unit.get("kind") != "candidate":
            continue
        out.append(_outcome(f, unit))
    return out


def _outcome(path: Path, unit: dict[str, Any]) -> UnitOutcome:
    import pyarrow.parquet as pq

    t = pq.read_table(path, columns=COLUMNS).to_pydict()
    seqs: dict[str, Sequence] = {}
    order = sorted(range(len(t["step"])), key=lambda k: (t["mode"][k], t["prompt_id"][k], t["step"][k]))
    for k in order:
        pid, mode = t["prompt_id"][k], t["mode"][k]
        s = seqs.setdefault(pid, Sequence(pid, int(t["prompt_len"][k]), True, None, 0))
        if mode == "free":  # (a sequence that ends early differs where it ends: flip, not first_divergence)
            s.steps += 1
            if t["flip"][k] and s.identical:
                s.identical, s.first_divergence = False, int(t["step"][k])
            if t["first_divergence"][k] and t["severity"][k]:
                s.severities.append(t["severity"][k])
        elif mode == "sync":
            s.forced_steps += 1
            if t["flip"][k]:
                s.flip_steps.append(int(t["step"][k]))
                s.candidate_margins.append(float(t["batched_margin"][k]))
                s.reference_margins.append(float(t["solo_margin"][k]))
    return UnitOutcome(path.name, str(unit.get("condition")), int(unit.get("batch_size") or 1),
                       int(unit.get("round") or 0), str(unit.get("variant") or ""), unit.get("spacing"),
                       float(unit.get("seconds") or 0.0), list(unit.get("requests") or []), list(seqs.values()))


def select(units: Iterable[UnitOutcome], condition: str, variant: str = "") -> dict[int, list[UnitOutcome]]:
    """The units of one condition and prompt variant, by level."""
    out: dict[int, list[UnitOutcome]] = {}
    for u in units:
        if u.condition == condition and u.variant == variant:
            out.setdefault(u.level, []).append(u)
    return dict(sorted(out.items()))


def differs(units: Iterable[UnitOutcome]) -> bool:
    """Whether any recorded sequence of these units parted from its reference."""
    return any(not s.identical for u in units for s in u.sequences)


# --------------------------------------------------------------------------- one row of a card


def _quantiles(xs: list[float]) -> dict[str, float] | None:
    xs = sorted(x for x in xs if x == x)
    if not xs:
        return None
    return {"min": xs[0], "median": statistics.median(xs), "max": xs[-1]}


def position_bins(steps: int) -> list[tuple[int, int]]:
    """Token-position bins [from, to): 0, 1, 2-3, 4-7, ... up to ``steps``."""
    edges, lo = [], 0
    while lo < steps:
        hi = 1 if lo == 0 else 2 * lo
        edges.append((lo, min(hi, steps)))
        lo = hi
    return edges


def level_row(units: list[UnitOutcome], level: int, max_new_tokens: int) -> dict[str, Any]:
    """One level of one series, pooled over its units (every round): sequences identical to the
    reference with a 95 % interval, the spread across rounds, the teacher-forced per-step flip rate,
    where sequences parted (token positions), margins and severities at flips, throughput, retries."""
    seqs = [s for u in units for s in u.sequences]
    n, k = len(seqs), sum(s.identical for s in seqs)
    rounds: dict[int, list[Sequence]] = {}
    for u in units:
        rounds.setdefault(u.round, []).extend(u.sequences)
    per_round = [{"round": r, "identical": sum(s.identical for s in ss), "sequences": len(ss)}
                 for r, ss in sorted(rounds.items())]
    shares = [p["identical"] / p["sequences"] for p in per_round if p["sequences"]]
    forced = sum(s.forced_steps for s in seqs)
    flips = sum(len(s.flip_steps) for s in seqs)
    firsts = sorted(s.first_divergence for s in seqs if s.first_divergence is not None)
    severity: dict[str, int] = {}
    for s in seqs:
        for v in s.severities:
            severity[v] = severity.get(v, 0) + 1
    reqs = [r for u in units for r in u.requests]
    # a group's wall time; requests sent one at a time: their own times (a warm request's prime aside)
    single = units[0].condition in ("alone", "warm-cache")
    seconds = sum(float(r.get("seconds") or 0) for r in reqs) if single else sum(u.seconds for u in units)
    tokens = sum(int(r.get("tokens") or 0) for r in reqs)
    cached = [r["cached_tokens"] for r in reqs if r.get("cached_tokens") is not None]
    prompt = [s.prompt_len for s in seqs if s.prompt_len] or [int(r["prompt_tokens"]) for r in reqs
                                                               if r.get("prompt_tokens")]
    bins = []
    for lo, hi in position_bins(max_new_tokens):
        steps = sum(min(s.forced_steps, hi) - lo for s in seqs if s.forced_steps > lo)
        bins.append({"from": lo, "to": hi, "steps": steps,
                     "flips": sum(lo <= t < hi for s in seqs for t in s.flip_steps)})
    spacing = sorted({u.spacing for u in units if u.spacing is not None})
    return {
        "level": level, "condition": units[0].condition, "variant": units[0].variant, "rounds": len(per_round),
        "sequences": n, "identical": proportion(k, n), "per_round": per_round,
        "spread": [min(shares), max(shares)] if shares else None,
        "flips": proportion(flips, forced),
        "first_divergence": _quantiles([float(x) for x in firsts]), "first_divergences": firsts,
        "lengths": sorted(s.steps for s in seqs),
        "margins_at_flips": {"candidate": _quantiles([m for s in seqs for m in s.candidate_margins]),
                             "reference": _quantiles([m for s in seqs for m in s.reference_margins])},
        "severity": severity or None,
        "flips_by_position": bins,
        "throughput": {"seconds": seconds, "requests": len(reqs), "tokens": tokens,
                       "tokens_per_second": tokens / seconds if seconds else None,
                       "requests_per_second": len(reqs) / seconds if seconds else None},
        "retried_requests": sum(int((r.get("attempts") or 1) > 1) for r in reqs),
        "cached_prompt_tokens": statistics.median(cached) if cached else None,
        "prompt_tokens": {"min": min(prompt), "max": max(prompt)} if prompt else None,
        "spacing_seconds": spacing[0] if len(spacing) == 1 else (spacing or None),
    }


def onset(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The first level (of ``rows``, sorted by level) where any sequence differs from its reference,
    with the evidence: how many differed there (95 % interval), how many at the level tested just
    below (none, by definition: the 95 % upper bound of that rate), whether those two levels are
    adjacent (the onset located exactly), and the levels above it that were identical again."""
    if not rows:
        return {"level": None, "tested": [], "statement": "nothing tested"}
    tested = [r["level"] for r in rows]
    first = next((r for r in rows if r["identical"]["k"] < r["identical"]["n"]), None)
    if first is None:
        top = rows[-1]
        up = interval95(0, top["sequences"])
        return {"level": None, "tested": tested, "identical_up_to": top["level"],
                "at_top": {"level": top["level"], "sequences": top["sequences"],
                           "differing_upper95": up[1] if up else None},
                "statement": f"identical at every level tested, up to {top['level']} in flight "
                             f"({top['sequences']} sequences there; 95 % upper bound of the share that "
                             f"differs: {_pct(up[1]) if up else '-'})"}
    below = [r for r in rows if r["level"] < first["level"]]
    b = below[-1] if below else None
    n = first["sequences"]
    diff = proportion(n - first["identical"]["k"], n)
    out: dict[str, Any] = {
        "level": first["level"], "tested": tested, "differing": diff,
        "below": None if b is None else {"level": b["level"], "sequences": b["sequences"],
                                         "differing_upper95": interval95(0, b["sequences"])[1]},
        "exact": b is None or first["level"] - b["level"] == 1,
        "identical_up_to": None if b is None else b["level"],
        "identical_above": [r["level"] for r in rows if r["level"] > first["level"]
                            and r["identical"]["k"] == r["identical"]["n"]],
    }
    text = (f"first differs at {first['level']} in flight: {diff['k']} of {n} sequences "
            f"({_pct(diff['rate'])}, 95 % CI {_pct(diff['ci95'][0])}-{_pct(diff['ci95'][1])})")
    if b is not None:
        text += (f"; at {b['level']}: 0 of {b['sequences']} (95 % upper bound "
                 f"{_pct(out['below']['differing_upper95'])})")
    out["statement"] = text
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.3g} %"
