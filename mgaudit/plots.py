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

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path
