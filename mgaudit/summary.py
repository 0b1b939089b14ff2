"""Summaries of a trace table: flip rates, diverged sequences, margins at flips.

Pure functions over a pyarrow table with the trace schema (no torch).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

QUANTILES = (0.0, 0.5, 0.9, 0.99, 1.0)


def _quantiles(x: np.ndarray) -> dict[str, float] | None:
    x = x[np.isfinite(x)]
    if x.size == 0:
        return None
    return {f"q{int(q * 100):02d}" if q < 1 else "max": float(np.quantile(x, q)) for q in QUANTILES}


def _col(t: pa.Table, name: str) -> np.ndarray:
    return t.column(name).to_numpy(zero_copy_only=False)


def sync_stats(t: pa.Table) -> dict[str, Any]:
    flips = _col(t, "flip")
    bm, sm = _col(t, "batched_margin"), _col(t, "solo_margin")
    diff = _col(t, "max_abs_logit_diff").astype(float)
    n = int(flips.size)
    k = int(flips.sum())
    return {
        "steps": n,
        "flips": k,
        "flip_rate": k / n if n else 0.0,
        "sequences": len(set(_col(t, "prompt_id").tolist())),
        "sequences_with_flip": len(set(_col(t, "prompt_id")[flips].tolist())),
        "batched_margin_at_flips": _quantiles(bm[flips]),
        "solo_margin_at_flips": _quantiles(sm[flips]),
        "max_batched_margin_at_flip": float(bm[flips].max()) if k else None,
        "max_abs_logit_diff": _quantiles(diff),
        "solo_ties": int((sm == 0).sum()),
    }


def free_sequences(t: pa.Table) -> list[dict[str, Any]]:
    """One record per (prompt, condition, batch size, round): first divergent step and tokens that differ."""
    out = []
    pid, bs, cond, rnd = _col(t, "prompt_id"), _col(t, "batch_size"), _col(t, "condition"), _col(t, "round")
    step, flip = _col(t, "step"), _col(t, "flip")
    st, bt = _col(t, "solo_token"), _col(t, "batched_token")
    order = np.lexsort((step, pid, rnd, bs, cond))
    keys = list(zip(cond[order].tolist(), bs[order].tolist(), rnd[order].tolist(), pid[order].tolist()))
    start = 0
    for i in range(1, len(order) + 1):
        if i == len(order) or keys[i] != keys[start]:
            idx = order[start:i]
            f = flip[idx]
            first = int(step[idx][f].min()) if f.any() else None
            c, b, r, p = keys[start]
            out.append({
                "condition": str(c),
                "batch_size": int(b),
                "round": int(r),
                "prompt_id": str(p),
                "diverged": bool(f.any()),
                "first_divergence": first,
                "tokens_differ": int(f.sum()),
                "solo_len": int((st[idx] >= 0).sum()),
                "batched_len": int((bt[idx] >= 0).sum()),
            })
            start = i
    return out


def severity_counts(t: pa.Table) -> dict[str, int] | None:
    """Counts of the severities recorded at divergences (None where no threshold was given)."""
    sev = [s for s in t.filter(t.column("first_divergence")).column("severity").to_pylist()]
    if not sev or all(s is None for s in sev):
        return None
    out: dict[str, int] = {}
    for s in sev:
        out[s or "unclassified"] = out.get(s or "unclassified", 0) + 1
    return out


def summarize(table: pa.Table) -> dict[str, Any]:
    """Per condition and batch size: sync flip statistics and free-running sequence divergence."""
    by: list[dict[str, Any]] = []
    sequences: list[dict[str, Any]] = []
    modes = _col(table, "mode") if table.num_rows else np.array([])
    solo = table.filter(pc.equal(table.column("mode"), "solo")) if table.num_rows else table
    runs = table.filter(pc.not_equal(table.column("mode"), "solo")) if table.num_rows else table
    keys = sorted(set(zip(_col(runs, "condition").tolist(), _col(runs, "batch_size").tolist()))) \
        if runs.num_rows else []
    for cond, b in keys:
        entry: dict[str, Any] = {"condition": str(cond), "batch_size": int(b)}
        tb = runs.filter(pc.and_(pc.equal(runs.column("condition"), cond), pc.equal(runs.column("batch_size"), b)))
        entry["rounds"] = len(set(_col(tb, "round").tolist()))
        sync = tb.filter(pc.equal(tb.column("mode"), "sync"))
        free = tb.filter(pc.equal(tb.column("mode"), "free"))
        if sync.num_rows:
            entry["sync"] = sync_stats(sync)
            entry["sync"]["severity"] = severity_counts(sync)
        if free.num_rows:
            seqs = free_sequences(free)
            sequences.extend(seqs)
            firsts = [s["first_divergence"] for s in seqs if s["diverged"]]
            entry["free"] = {
                "sequences": len(seqs),
                "sequences_diverged": sum(s["diverged"] for s in seqs),
                "first_divergence_median": float(np.median(firsts)) if firsts else None,
                "tokens_differ": int(sum(s["tokens_differ"] for s in seqs)),
                "shorter_than_reference": sum(s["batched_len"] < s["solo_len"] for s in seqs),
                "severity": severity_counts(free),
            }
        by.append(entry)
    solo_m = _col(solo, "solo_margin") if solo.num_rows else np.array([])
    return {
        "solo": {
            "sequences": len(set(_col(solo, "prompt_id").tolist())) if solo.num_rows else 0,
            "steps": int(solo.num_rows),
            "ties": int((solo_m == 0).sum()),
            "margin": _quantiles(solo_m.astype(float)) if solo.num_rows else None,
        },
        "by_condition": by,
        "sequences": sequences,
        "rows": int(table.num_rows),
        "modes": sorted(set(modes.tolist())),
    }


def runs_summary(units: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per condition and batch size, from the trace files' unit records: sequences, seconds, tokens
    per second, finish reasons, retried requests, cached prompt tokens."""
    by: dict[tuple, dict[str, Any]] = {}
    for u in units:
        key = (u.get("condition", "alone"), u.get("batch_size", 1), u.get("kind"))
        e = by.setdefault(key, {"kind": u.get("kind"), "condition": key[0], "batch_size": key[1], "sequences": 0,
                                "seconds": 0.0, "tokens": 0, "retried": 0, "finish_reasons": {},
                                "cached_tokens": []})
        e["seconds"] += float(u.get("seconds") or 0.0)
        for r in u.get("requests", [])[: u.get("owned") or None]:
            e["sequences"] += 1
            e["tokens"] += r["tokens"]
            e["retried"] += int((r.get("attempts") or 1) > 1)
            fr = str(r.get("finish_reason"))
            e["finish_reasons"][fr] = e["finish_reasons"].get(fr, 0) + 1
            if r.get("cached_tokens") is not None:
                e["cached_tokens"].append(r["cached_tokens"])
    out = []
    for e in by.values():
        cached = e.pop("cached_tokens")
        e["cached_tokens_median"] = float(np.median(cached)) if cached else None
        e["tokens_per_second"] = e["tokens"] / e["seconds"] if e["seconds"] else None
        if not e["finish_reasons"] or set(e["finish_reasons"]) == {"None"}:
            e["finish_reasons"] = None
        out.append(e)
    return sorted(out, key=lambda e: (e["kind"] != "reference", e["condition"], e["batch_size"]))
