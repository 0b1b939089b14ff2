"""``mgaudit calibrate``: fit the gate threshold tau from scan traces."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.table import Table

from . import console
from . import options
from .boundary import guarded


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100.0 * x:.2f}%"


def _tau(x: float | None) -> str:
    """The shortest decimal that reads back as the same float32 (a fitted tau often sits one float32
    step above a flip margin: 0.12500001 rather than 0.125; the smallest subnormal is 1e-45)."""
    from ..formats.gate import float32_text

    return "-" if x is None else float32_text(x)


def _ci(ci: Any) -> str:
    return "" if not ci else f" [{100.0 * ci[0]:.1f}, {100.0 * ci[1]:.1f}]"


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
    table = Table(title="at the chosen tau, per batch size (95% intervals in brackets)")
    for col in ("batch size", "steps", "flips", "flip rate", "recall", "trigger rate", "flips missed"):
        table.add_column(col, justify="right")
    for bs, f in sorted(figures["per_batch_size"].items(), key=lambda kv: int(kv[0])):
        table.add_row(bs, str(f["steps"]), str(f["flips"]), _pct(f["flip_rate"]) + _ci(f["flip_rate_ci95"]),
                      _pct(f["recall"]) + _ci(f["recall_ci95"]),
                      _pct(f["trigger_rate"]) + _ci(f["trigger_rate_ci95"]), str(f["flips_missed"]))
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
    how = (f"covers {f['flips_covered']} of {f['flips']} flips (recall {_pct(f['recall'])}, 95% interval"
           f"{_ci(f['recall_ci95'])})" if f["flips"] else "no flips were seen to check it against")
    origin = (f"recall fit {_tau(result.fit.get('recall_fit'))} + safety {_tau(result.parameters['safety'])}"
              if result.method == "recall" else
              f"{_tau(result.parameters['bound_factor'])} x B, B = q{result.parameters['bound_quantile']:g} "
              f"of max |dlogit| = {_tau(result.fit.get('bound_B'))}")
    return (f"chosen tau = {_tau(result.threshold)} (method {result.method}: {origin}); on {f['steps']} sync steps "
            f"(flip rate {_pct(f['flip_rate'])}{_ci(f['flip_rate_ci95'])}) it {how} and verifies {f['triggered']} "
            f"steps (trigger rate {_pct(f['trigger_rate'])}{_ci(f['trigger_rate_ci95'])}, "
            f"{f['flips_missed']} flips missed)")


def render_result(result: Any) -> None:
    console.out.print(_candidates_table(result))
    console.out.print(_per_batch_table(result.figures))
    console.out.print(_in_words(result), soft_wrap=True, markup=False)
    for w in result.warnings:
        console.out.print(f"warning: {w}", soft_wrap=True, markup=False, style="yellow")
    if result.transfer:
        console.out.print(_transfer_table(result))


@guarded
def calibrate_cmd(
    traces: List[Path] = typer.Argument(..., metavar="DIR...",
                                        help="Trace directories (or files) written by `mgaudit scan`, each once."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", metavar="FILE",
                                       help="Write the gate file (gate.json) here."),
    method: str = typer.Option("recall", "--method", metavar="METHOD", help="recall: cover the observed flips; "
                               "bound: bound-factor x a quantile of max |dlogit| (needs no flips)."),
    target_recall: float = typer.Option(1.0, "--target-recall", metavar="X", help="Fraction of flips tau must cover, in (0, 1]."),
    safety: float = typer.Option(0.0625, "--safety", metavar="X", help="Logits added to the recall fit "
                                 "(default: one bf16 quantum at typical logit sizes)."),
    bound_quantile: float = typer.Option(0.999, "--bound-quantile", metavar="X", help="Quantile of max |dlogit| for --method bound."),
    bound_factor: float = typer.Option(2.0, "--bound-factor", metavar="X", help="tau = factor x that quantile (--method bound)."),
    eval_traces: Optional[List[Path]] = typer.Option(None, "--eval", metavar="DIR", help="Trace directory to test the fitted "
                                                     "tau on (repeatable)."),
    plot: Optional[Path] = typer.Option(None, "--plot", metavar="FILE", help="Write a PNG of margins and the recall/trigger curve."),
    batch_size: Optional[List[int]] = typer.Option(None, "--batch-size", metavar="N", help="Use only this batch size "
                                                   "(repeatable; default: all)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON instead of tables."),
    quiet: bool = options.QUIET,
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
    for path in (out, plot):
        if path is not None and not quiet:
            console.say(f"wrote {path}")


def register(app: typer.Typer) -> None:
    app.command("calibrate")(calibrate_cmd)
