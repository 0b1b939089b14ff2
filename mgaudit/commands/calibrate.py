"""``mgaudit calibrate``: fit the gate threshold tau from scan traces."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import numpy as np
import typer
from rich.table import Table

from .. import console
from .boundary import guarded


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100.0 * x:.2f}%"


def _tau(x: float | None) -> str:
    """Shortest text that tells float32 neighbours apart (a fitted tau often sits one float32 step
    above a flip margin: 0.12500001 rather than 0.125)."""
    if x is None:
        return "-"
    if x == 0 or abs(x) < 1e-4 or abs(x) >= 1e6:
        return f"{x:.3g}"
    return np.format_float_positional(np.float32(x), trim="-")


def _candidates_table(result: Any) -> Table:
    marks = {}
    for name, t in (("recall", result.recall_tau), ("bound", result.bound_tau)):
        if t is not None:
            marks.setdefault(t, []).append(name)
    table = Table(title="tau candidates (verify when batched_margin < tau; sync steps)")
    table.add_column("tau", justify="right")
    table.add_column("recall", justify="right")
    table.add_column("trigger rate", justify="right")
    table.add_column("flips missed", justify="right")
    table.add_column("", justify="left")
    for c in result.candidates:
        note = list(marks.get(c["tau"], []))
        chosen = c["tau"] == result.threshold
        if chosen:
            note.insert(0, "<- chosen")
        table.add_row(_tau(c["tau"]), _pct(c["recall"]), _pct(c["trigger_rate"]), str(c["flips_missed"]),
                      " ".join(note), style="bold" if chosen else None)
    return table


def _per_batch_table(figures: dict[str, Any]) -> Table:
    table = Table(title="at the chosen tau, per batch size")
    for col in ("batch size", "steps", "flips", "recall", "trigger rate", "flips missed"):
        table.add_column(col, justify="right")
    for bs, f in sorted(figures["per_batch_size"].items(), key=lambda kv: int(kv[0])):
        table.add_row(bs, str(f["steps"]), str(f["flips"]), _pct(f["recall"]), _pct(f["trigger_rate"]),
                      str(f["flips_missed"]))
    return table


def _transfer_table(result: Any) -> Table:
    table = Table(title=f"transfer of tau = {_tau(result.threshold)} to other traces")
    for col in ("traces", "steps", "flips", "recall", "trigger rate", "flips missed"):
        if col == "traces":
            table.add_column(col, justify="left", overflow="fold")
        else:
            table.add_column(col, justify="right")
    for t in result.transfer:
        table.add_row(t["traces"], str(t["steps"]), str(t["flips"]), _pct(t["recall"]), _pct(t["trigger_rate"]),
                      str(t["flips_missed"]))
    return table


def _in_words(result: Any) -> str:
    f = result.figures
    how = (f"covers {f['flips_covered']} of {f['flips']} flips (recall {_pct(f['recall'])})"
           if f["flips"] else "no flips were seen to check it against")
    origin = (f"recall fit {_tau(result.fit.get('recall_fit'))} + safety {_tau(result.parameters['safety'])}"
              if result.method == "recall" else
              f"{_tau(result.parameters['bound_factor'])} x B, B = q{result.parameters['bound_quantile']:g} "
              f"of max |dlogit| = {_tau(result.fit.get('bound_B'))}")
    return (f"chosen tau = {_tau(result.threshold)} (method {result.method}: {origin}); on {f['steps']} sync steps "
            f"it {how} and verifies {f['triggered']} steps (trigger rate {_pct(f['trigger_rate'])}, "
            f"{f['flips_missed']} flips missed)")


def render_result(result: Any) -> None:
    console.out.print(_candidates_table(result))
    console.out.print(_per_batch_table(result.figures))
    console.out.print(_in_words(result), soft_wrap=True)
    if result.transfer:
        console.out.print(_transfer_table(result))


def register(app: typer.Typer) -> None:
    @app.command("calibrate")
    @guarded
    def calibrate_cmd(
        traces: List[Path] = typer.Argument(..., help="Trace directories (or files) written by `mgaudit scan`."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the gate file (gate.json) here."),
        method: str = typer.Option("recall", "--method", help="recall: cover the observed flips; "
                                   "bound: bound-factor x a quantile of max |dlogit| (needs no flips)."),
        target_recall: float = typer.Option(1.0, "--target-recall", help="Fraction of flips tau must cover, in (0, 1]."),
        safety: float = typer.Option(0.0625, "--safety", help="Logits added to the recall fit "
                                     "(default: one bf16 quantum at typical logit sizes)."),
        bound_quantile: float = typer.Option(0.999, "--bound-quantile", help="Quantile of max |dlogit| for --method bound."),
        bound_factor: float = typer.Option(2.0, "--bound-factor", help="tau = factor x that quantile (--method bound)."),
        eval_traces: Optional[List[Path]] = typer.Option(None, "--eval", help="Trace directory to test the fitted "
                                                         "tau on (repeatable)."),
        plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG of margins and the recall/trigger curve."),
        batch_size: Optional[List[int]] = typer.Option(None, "--batch-size", help="Use only this batch size "
                                                       "(repeatable; default: all)."),
        as_json: bool = typer.Option(False, "--json", help="Print the result as JSON instead of tables."),
    ) -> None:
        """Fit the gate threshold tau (verify when batched_margin < tau) from the sync rows of scan traces."""
        from ..calibrate import CalibrateConfig, calibrate

        config = CalibrateConfig(
            traces=list(traces),
            out=out,
            method=method,
            target_recall=target_recall,
            safety=safety,
            bound_quantile=bound_quantile,
            bound_factor=bound_factor,
            eval_traces=list(eval_traces or []),
            plot=plot,
            batch_sizes=list(batch_size) if batch_size else None,
        )
        result = calibrate(config)
        if as_json:
            console.print_json(result.to_dict())
        else:
            render_result(result)
        if out is not None:
            console.err.print(f"wrote {out}")
        if plot is not None:
            console.err.print(f"wrote {plot}")
