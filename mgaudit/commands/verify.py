"""``mgaudit verify``: gated decoding must reproduce the solo output exactly (a CI gate)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from .. import console
from . import options
from .boundary import guarded


def render(report: dict[str, Any]) -> None:
    s, pol = report["summary"], report["policy"]
    name = pol["name"] + (f" (tau={pol['threshold_text']}, {pol['fast_path']} fast path)" if pol["name"] == "gate" else "")
    table = Table(title=f"verify: policy {name}, batch size {pol['batch_size']}")
    table.add_column("sequences identical to solo", justify="right")
    table.add_column("trigger rate", justify="right")
    table.add_column("mismatches repaired", justify="right")
    table.add_column("solo s", justify="right")
    table.add_column("policy s", justify="right")
    table.add_column("speed-up vs solo", justify="right")
    table.add_row(f"{s['identical']}/{s['sequences']}", f"{100 * s['trigger_rate']:.1f}%", str(s["repairs"]),
                  f"{s['solo_seconds']:.1f}", f"{s['policy_seconds']:.1f}",
                  f"{s['speedup_vs_solo']:.2f}x" if s["speedup_vs_solo"] else "-")
    console.out.print(table)
    bad = [r for r in report["sequences"] if not r["identical"]]
    if bad:
        t = Table(title="sequences that differ from solo")
        for col in ("prompt", "first divergent step", "solo token", "policy token", "solo margin",
                    "batched margin", "verified there"):
            t.add_column(col)
        for r in bad:
            def fmt(x):
                return "-" if x is None else f"{x:.4g}"
            t.add_row(escape(r["prompt_id"]), str(r["first_divergence"]),
                      escape(repr(r["solo_text"])), escape(repr(r["gated_text"])),
                      fmt(r["solo_margin"]), fmt(r["gated_margin"]), str(r["verified_at_divergence"]))
        console.out.print(t)
        console.out.print(f"[bold red]FAIL[/]: {len(bad)} of {s['sequences']} sequences differ from solo")
    else:
        console.out.print(f"[bold green]PASS[/]: all {s['sequences']} sequences identical to solo")


def register(app: typer.Typer) -> None:
    @app.command("verify")
    @guarded
    def verify_cmd(
        prompts: str = options.PROMPTS_ARG,
        gate: Path = typer.Option(None, "--gate", help="gate.json written by `mgaudit calibrate`."),
        threshold: float = typer.Option(None, "--threshold", help="Gate threshold tau (instead of --gate)."),
        policy: str = typer.Option("gate", "--policy",
                                   help="none (plain padded batching), always (verify every step), "
                                        "gate (verify below tau), invariant (batch-invariant path, no verifier)."),
        fast_path: str = typer.Option("ragged", "--fast-path",
                                      help="gate's fast path: ragged (solo prefill, unpadded attention) or padded "
                                           "(the paper's design: padded batch, verified below tau)."),
        max_rows: int = typer.Option(None, "--max-rows", help="GEMM rows per chunk on the ragged path "
                                                               "(default: measured on the model)."),
        batch_size: int = typer.Option(16, "--batch-size", "-b", help="Prompts decoded together."),
        max_new_tokens: int = options.MAX_NEW,
        model: str = options.MODEL,
        dtype: str = options.DTYPE,
        device: str = options.DEVICE,
        attn: str = options.ATTN,
        limit: int = options.LIMIT,
        no_chat: bool = options.NO_CHAT,
        report: Path = typer.Option(None, "--report", help="Write the full report (per-sequence records) as JSON."),
        json_out: bool = options.JSON,
    ) -> None:
        """Decode PROMPTS solo and under a policy; exit 0 only if every sequence is identical to solo."""
        from ..verify import VerifyConfig, verify

        config = VerifyConfig(prompts=prompts, model=model, dtype=dtype, device=device, policy=policy, gate=gate,
                              threshold=threshold, fast_path=fast_path, max_rows=max_rows, batch_size=batch_size,
                              max_new_tokens=max_new_tokens, limit=limit, chat=not no_chat,
                              attn_implementation=attn, report=report)
        with console.progress() as bar:
            result = verify(config, progress=bar, log=lambda m: console.err.print(m))
        if json_out:
            console.print_json(result)
        else:
            render(result)
        if report:
            console.err.print(f"report written to {report}")
        raise typer.Exit(0 if result["summary"]["all_identical"] else 1)
