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
    """One record per (prompt, batch size): first divergent step and tokens that differ."""
    out = []
    pid, bs = _col(t, "prompt_id"), _col(t, "batch_size")
    step, flip = _col(t, "step"), _col(t, "flip")
    st, bt = _col(t, "solo_token"), _col(t, "batched_token")
    order = np.lexsort((step, pid, bs))
    keys = list(zip(bs[order].tolist(), pid[order].tolist()))
    start = 0
    for i in range(1, len(order) + 1):
        if i == len(order) or keys[i] != keys[start]:
            idx = order[start:i]
            f = flip[idx]
            first = int(step[idx][f].min()) if f.any() else None
            out.append({
                "batch_size": int(keys[start][0]),
                "prompt_id": str(keys[start][1]),
                "diverged": bool(f.any()),
                "first_divergence": first,
                "tokens_differ": int(f.sum()),
                "solo_len": int((st[idx] >= 0).sum()),
                "batched_len": int((bt[idx] >= 0).sum()),
            })
            start = i
    return out


def summarize(table: pa.Table) -> dict[str, Any]:
    """Per batch size: sync flip statistics and free-running sequence divergence."""
    by_bs: list[dict[str, Any]] = []
    sequences: list[dict[str, Any]] = []
    sizes = sorted(set(_col(table, "batch_size").tolist()) - {1}) if table.num_rows else []
    modes = _col(table, "mode") if table.num_rows else np.array([])
    solo = table.filter(pc.equal(table.column("mode"), "solo")) if table.num_rows else table
    for b in sizes:
        entry: dict[str, Any] = {"batch_size": int(b)}
        tb = table.filter(pc.equal(table.column("batch_size"), b))
        sync = tb.filter(pc.equal(tb.column("mode"), "sync"))
        free = tb.filter(pc.equal(tb.column("mode"), "free"))
        if sync.num_rows:
            entry["sync"] = sync_stats(sync)
        if free.num_rows:
            seqs = free_sequences(free)
            sequences.extend(seqs)
            firsts = [s["first_divergence"] for s in seqs if s["diverged"]]
            entry["free"] = {
                "sequences": len(seqs),
                "sequences_diverged": sum(s["diverged"] for s in seqs),
                "first_divergence_median": float(np.median(firsts)) if firsts else None,
                "tokens_differ": int(sum(s["tokens_differ"] for s in seqs)),
            }
        by_bs.append(entry)
    solo_m = _col(solo, "solo_margin") if solo.num_rows else np.array([])
    return {
        "solo": {
            "sequences": len(set(_col(solo, "prompt_id").tolist())) if solo.num_rows else 0,
            "steps": int(solo.num_rows),
            "ties": int((solo_m == 0).sum()),
            "margin": _quantiles(solo_m.astype(float)) if solo.num_rows else None,
        },
        "by_batch_size": by_bs,
        "sequences": sequences,
        "rows": int(table.num_rows),
        "modes": sorted(set(modes.tolist())),
    }
