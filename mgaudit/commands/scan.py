"""``mgaudit scan``: replay prompts solo and batched, record every step into Parquet."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from .. import console
from . import options
from .boundary import guarded


def render_summary(summary: dict[str, Any], out: Path) -> None:
    table = Table(title=f"scan: {summary['provenance']['prompts']['name']} on {summary['provenance']['model']['name']}")
    for col in ("batch size", "sync steps", "flips", "flip rate", "max batched margin at flip",
                "sequences diverged (free)", "median first divergence"):
        table.add_column(col, justify="right")
    for e in summary["by_batch_size"]:
        s, f = e.get("sync", {}), e.get("free", {})
        mm = s.get("max_batched_margin_at_flip")
        fd = f.get("first_divergence_median")
        table.add_row(
            str(e["batch_size"]),
            str(s.get("steps", "-")),
            str(s.get("flips", "-")),
            f"{100 * s['flip_rate']:.2f}%" if s else "-",
            "-" if mm is None else f"{mm:.4g}",
            f"{f['sequences_diverged']}/{f['sequences']}" if f else "-",
            "-" if fd is None else f"{fd:g}",
        )
    console.out.print(table)
    solo = summary["solo"]
    console.out.print(f"solo reference: {solo['sequences']} sequences, {solo['steps']} steps, "
                      f"{solo['ties']} exact ties (margin 0). Traces: {out}")


def register(app: typer.Typer) -> None:
    @app.command("scan")
    @guarded
    def scan_cmd(
        prompts: str = options.PROMPTS_ARG,
        out: Path = typer.Option(..., "--out", "-o", help="Directory for the Parquet traces."),
        batch_sizes: str = typer.Option("4,8,16", "--batch-sizes", help="Comma-separated batch sizes to replay."),
        max_new_tokens: int = options.MAX_NEW,
        seed: int = typer.Option(0, "--seed", help="Seeds which prompts share a batch (and torch)."),
        model: str = options.MODEL,
        dtype: str = options.DTYPE,
        device: str = options.DEVICE,
        attn: str = options.ATTN,
        limit: int = options.LIMIT,
        no_chat: bool = options.NO_CHAT,
        modes: str = typer.Option("sync,free", "--modes", help="sync (teacher-forced), free (free-running), or both."),
        resume: bool = typer.Option(False, "--resume", help="Continue an interrupted scan in --out."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Delete traces already in --out first."),
        json_out: bool = options.JSON,
    ) -> None:
        """Replay PROMPTS solo and inside batches; record tokens, top-1/top-2 logits, margins and flips."""
        from ..scan import ScanConfig, parse_batch_sizes, scan

        config = ScanConfig(
            prompts=prompts, out=out, model=model, dtype=dtype, device=device,
            batch_sizes=parse_batch_sizes(batch_sizes), max_new_tokens=max_new_tokens, seed=seed,
            limit=limit, chat=not no_chat, modes=[m for m in modes.split(",") if m],
            attn_implementation=attn, resume=resume, overwrite=overwrite,
        )
        with console.progress() as bar:
            result = scan(config, progress=bar, log=lambda m: console.err.print(m))
        if json_out:
            console.print_json(result.summary)
        else:
            render_summary(result.summary, result.out)
