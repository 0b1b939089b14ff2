"""``mgaudit demo``: scan, calibrate and verify on the default model and sample sets."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from . import console
from . import options
from .boundary import guarded


@guarded(on_interrupt="rerun the same command to continue: the scan resumes where it stopped")
def demo_cmd(
    out: Path = typer.Option(Path("mgaudit-out"), "--out", "-o", metavar="DIR",
                             help="Directory for traces, gate and reports."),
    calibrate_on: str = typer.Option("math", "--calibrate-on", metavar="PROMPTS",
                                     help="Prompt set to scan and calibrate on."),
    verify_on: str = typer.Option("code,chat", "--verify-on", metavar="LIST",
                                  help="Comma-separated sets to verify on."),
    paper: bool = typer.Option(False, "--paper", help="The paper-size run: 16 prompts a set, 64 new tokens, "
                               "scan batch sizes 4,8,16, verify at batch size 16 (about 4x the default)."),
    limit: Optional[int] = typer.Option(None, "--limit", metavar="N",
                                        help="Prompts per set [default: 8; 16 with --paper]."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", metavar="N",
                                                 help="Tokens to generate per prompt [default: 32; 64 with "
                                                      "--paper]."),
    model: str = options.MODEL,
    device: str = options.DEVICE,
    quiet: bool = options.QUIET,
) -> None:
    """The main job: scan a set, fit the gate, verify gated decoding on other sets, and a verdict (exit 1 if any
    verified sequence differs from solo)."""
    from ..demo import DemoConfig, run_demo
    from . import render
    from .calibrate import render_result

    base = DemoConfig.paper() if paper else DemoConfig()
    config = DemoConfig(out=out, model=model, device=device, calibrate_on=calibrate_on,
                        verify_on=[v for v in verify_on.split(",") if v], batch_sizes=base.batch_sizes,
                        verify_batch_size=base.verify_batch_size,
                        max_new_tokens=base.max_new_tokens if max_new_tokens is None else max_new_tokens,
                        limit=base.limit if limit is None else limit)
    with console.reporter(quiet) as progress:
        res = run_demo(config, progress=progress, log=console.logger(quiet))
    render.scan_summary(res["scan"].summary, res["scan"].out)
    render_result(res["calibration"])
    for name, report in res["verify"].items():
        console.out.print(f"[bold]verify on {name}[/]")
        render.verify_report(report)
    console.out.print(verdict_text(res["verdict"]), soft_wrap=True, markup=False)
    raise typer.Exit(0 if res["verdict"]["pass"] else 1)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_cmd)


def verdict_text(v: dict) -> str:
    from .calibrate import _tau

    plain, gated = v["plain_batching"], v["gated"]
    return (f"verdict: {'PASS' if v['pass'] else 'FAIL'}. Plain batched decoding flipped {plain['flips']} of "
            f"{plain['sync_steps']} teacher-forced steps and changed {plain['sequences_diverged']} of "
            f"{plain['sequences']} free-running sequences; with the gate (tau = {_tau(v['threshold'])}, "
            f"method {v['method']}) {gated['identical']} of {gated['sequences']} sequences of "
            f"{', '.join(gated['sets'])} were identical to solo.")
