"""``mgaudit demo``: scan, calibrate and verify on the default model and sample sets."""

from __future__ import annotations

from pathlib import Path

import typer

from .. import console
from . import options
from .boundary import guarded


def register(app: typer.Typer) -> None:
    @app.command("demo")
    @guarded
    def demo_cmd(
        out: Path = typer.Option(Path("mgaudit-out"), "--out", "-o", help="Directory for traces, gate and reports."),
        calibrate_on: str = typer.Option("math", "--calibrate-on", help="Prompt set to scan and calibrate on."),
        verify_on: str = typer.Option("code,chat", "--verify-on", help="Comma-separated sets to verify on."),
        limit: int = typer.Option(16, "--limit", help="Prompts per set."),
        max_new_tokens: int = options.MAX_NEW,
        model: str = options.MODEL,
        device: str = options.DEVICE,
    ) -> None:
        """The main job: scan a set, fit the gate, verify gated decoding on other sets. Exit 1 if any differ."""
        from ..demo import DemoConfig, run_demo
        from .calibrate import render_result
        from .scan import render_summary
        from .verify import render

        config = DemoConfig(out=out, model=model, device=device, calibrate_on=calibrate_on,
                            verify_on=[v for v in verify_on.split(",") if v], max_new_tokens=max_new_tokens,
                            limit=limit)
        with console.progress() as bar:
            res = run_demo(config, progress=bar, log=lambda m: console.err.print(m))
        render_summary(res["scan"].summary, res["scan"].out)
        render_result(res["calibration"])
        ok = True
        for name, report in res["verify"].items():
            console.out.print(f"[bold]verify on {name}[/]")
            render(report)
            ok = ok and report["summary"]["all_identical"]
        raise typer.Exit(0 if ok else 1)
