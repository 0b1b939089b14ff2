"""Figures. matplotlib is imported inside each function (Agg canvas, no pyplot state),
so importing mgaudit stays cheap and works without a display."""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from .formats.files import atomic_write_bytes

if TYPE_CHECKING:  # pragma: no cover
    from .calibrate import CalibrationResult


def _x_limit(margins: np.ndarray, flip_margins: np.ndarray, taus: list[float]) -> float:
    """Right edge of both panels: enough to show every flip and the taus, not the long stable tail."""
    hi = max([0.0] + [t for t in taus if t is not None])
    if flip_margins.size:
        hi = max(hi, float(flip_margins.max()))
    return max(2.0 * hi, 0.5)


def plot_calibration(result: "CalibrationResult", table: pa.Table, path: Path, dpi: int = 120) -> Path:
    """Two panels, written atomically as PNG to ``path``:

    (a) histogram (log y) of batched_margin for flipped vs stable sync steps, tau marked;
    (b) recall and trigger rate against tau, the chosen tau marked.

    ``table`` holds the sync rows the result was fitted on.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    margins = table["batched_margin"].to_numpy(zero_copy_only=False).astype(np.float64)
    flips = table["flip"].to_numpy(zero_copy_only=False).astype(bool)
    tau = float(result.threshold)
    alt = {"recall": result.recall_tau, "bound": result.bound_tau}
    xmax = _x_limit(margins, margins[flips], [tau, *alt.values()])

    fig = Figure(figsize=(12, 4.8), dpi=dpi)
    FigureCanvasAgg(fig)
    ax_h, ax_c = fig.subplots(1, 2)

    # (a) margins, clipped at xmax so the stable tail piles into the last bin
    bins = np.linspace(0.0, xmax, 61)
    clipped = np.clip(margins, 0.0, xmax)
    ax_h.hist(clipped[~flips], bins=bins, color="tab:blue", alpha=0.6, label=f"stable ({int((~flips).sum())})")
    ax_h.hist(clipped[flips], bins=bins, color="tab:red", alpha=0.8, label=f"flipped ({int(flips.sum())})")
    ax_h.set_yscale("log")
    ax_h.axvline(tau, color="black", lw=1.5, label=f"tau = {tau:.4g} ({result.method})")
    for name, t in alt.items():
        if t is not None and name != result.method and t <= xmax:
            ax_h.axvline(t, color="gray", ls="--", lw=1, label=f"{name} tau = {t:.4g}")
    ax_h.set_xlabel(f"batched top-1/top-2 margin (logits; clipped at {xmax:.3g})")
    ax_h.set_ylabel("sync steps")
    ax_h.set_title("(a) margin of flipped vs stable steps")
    ax_h.legend(fontsize=8)

    # (b) recall and trigger rate against tau
    grid = np.unique(np.concatenate([np.linspace(0.0, xmax, 400),
                                     [c["tau"] for c in result.candidates if c["tau"] <= xmax]]))
    sorted_all = np.sort(margins)
    sorted_flip = np.sort(margins[flips])
    trigger = np.searchsorted(sorted_all, grid, side="left") / max(sorted_all.size, 1)
    ax_c.plot(grid, trigger, color="tab:blue", label="trigger rate (steps verified)")
    if sorted_flip.size:
        recall = np.searchsorted(sorted_flip, grid, side="left") / sorted_flip.size
        ax_c.plot(grid, recall, color="tab:red", label="recall (flips caught)")
    ax_c.axvline(tau, color="black", lw=1.5, label=f"chosen tau = {tau:.4g}")
    fig_recall, fig_trigger = result.figures.get("recall"), result.figures.get("trigger_rate")
    if fig_trigger is not None:
        ax_c.plot([tau], [fig_trigger], "o", color="tab:blue")
    if fig_recall is not None:
        ax_c.plot([tau], [fig_recall], "o", color="tab:red")
    ax_c.set_xlim(0.0, xmax)
    ax_c.set_ylim(-0.02, 1.02)
    ax_c.set_xlabel("tau (verify when batched_margin < tau)")
    ax_c.set_ylabel("fraction")
    ax_c.set_title("(b) recall and trigger rate vs tau")
    ax_c.grid(alpha=0.3)
    ax_c.legend(fontsize=8, loc="center right")

    model = (result.provenance or {}).get("model", {})
    if isinstance(model, dict) and model.get("name"):
        fig.suptitle(f"{model.get('name')} ({model.get('dtype', '?')}): calibration on {len(margins)} sync steps")
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    """A figure written atomically as PNG."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _survival(row: dict) -> tuple[list[int], list[float]]:
    """Token positions and the share of a row's sequences identical to their run alone through each."""
    n = row["sequences"]
    last = max(row.get("lengths") or [1])
    firsts = sorted(row["first_divergences"])
    xs, ys, k = [], [], 0
    for t in range(last):
        while k < len(firsts) and firsts[k] <= t:
            k += 1
        xs.append(t)
        ys.append(1 - k / n if n else float("nan"))
    return xs, ys


def plot_card(card, path: Path, dpi: int = 110) -> Path:
    """A determinism card's figure, written atomically as PNG to ``path``: the share of sequences
    identical to their run alone (with 95 % intervals) and the per-step flip rate, against requests
    in flight (one line per concurrency series, markers for the other axes' rows) and against token
    position (one line per series, its most loaded row)."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 8), dpi=dpi)
    FigureCanvasAgg(fig)
    (a, b), (c, d) = fig.subplots(2, 2)
    seen: set[tuple] = set()  # a row shown in several axes (alone, say) is drawn once
    palette = matplotlib.colormaps["tab20"]
    for i, s in enumerate(card.series):
        label, color = f"{s['axis']}: {s['name']}", palette(i % 20)
        rows = [r for r in s["rows"] if s["axis"] == "concurrency" or (r["condition"], r["variant"], r["level"])
                not in seen]
        seen.update((r["condition"], r["variant"], r["level"]) for r in s["rows"])
        if rows:
            levels = [r["level"] for r in rows]
            share = [r["identical"]["rate"] for r in rows]
            err = [[r["identical"]["rate"] - r["identical"]["ci95"][0] for r in rows],
                   [r["identical"]["ci95"][1] - r["identical"]["rate"] for r in rows]]
            flips = [r["flips"]["rate"] if r["flips"]["n"] else np.nan for r in rows]
            style = "-o" if s["axis"] == "concurrency" else "s"
            a.errorbar(levels, share, yerr=err, fmt=style, color=color, label=label, capsize=3, ms=4)
            b.plot(levels, flips, style, color=color, label=label, ms=4)
        top = s["rows"][-1]
        if s["axis"] != "concurrency" and not any(r is top for r in rows):
            continue  # its most loaded row belongs to a series drawn before
        xs, ys = _survival(top)
        c.plot(xs, ys, color=color, drawstyle="steps-post", label=f"{label} ({top['level']} in flight)")
        bins = [x for x in top["flips_by_position"] if x["steps"]]
        d.plot([(x["from"] + x["to"] - 1) / 2 for x in bins], [x["flips"] / x["steps"] for x in bins], "-o",
               color=color, label=f"{label} ({top['level']} in flight)", ms=3)
    onsets: dict[int, list[str]] = {}
    for name, o in card.onsets.items():
        if o.get("level"):
            onsets.setdefault(o["level"], []).append(name)
    for level, names in onsets.items():
        a.axvline(level, color="gray", ls=":", lw=1)
        a.annotate(f"onset {level} ({', '.join(names)})", (level, 0.05), rotation=90, fontsize=7, color="gray")
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("requests in flight")
        ax.grid(alpha=0.3)
    a.set_ylim(-0.02, 1.02)
    c.set_ylim(-0.02, 1.02)
    a.set_ylabel("sequences identical to alone")
    b.set_ylabel("per-step flip rate (teacher-forced)")
    c.set_ylabel("sequences identical through the token")
    d.set_ylabel("per-step flip rate")
    for ax in (c, d):
        ax.set_xlabel("token position (generated token)")
        ax.grid(alpha=0.3)
    a.set_title("(a) identical share against concurrency")
    b.set_title("(b) flip rate against concurrency")
    c.set_title("(c) identical share against token position")
    d.set_title("(d) flip rate against token position")
    a.legend(fontsize=7, loc="lower left")
    c.legend(fontsize=7, loc="lower left")
    fig.suptitle(f"{card.headline()}: {card.engine.get('model')}, {card.sweep['prompts']} prompts x "
                 f"{card.sweep['rounds']} rounds, {card.sweep['max_new_tokens']} tokens", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
