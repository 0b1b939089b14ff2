"""``mgaudit scan``: replay prompts solo and batched, record every step into Parquet."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from . import console
from . import endpoint_cli, options
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
    @options.takes(options.STACK, options.SELECTION, endpoint_cli.CLIENT, options.OUTPUT)
    def scan_cmd(
        ctx: typer.Context,
        prompts: str = options.PROMPTS_ARG,
        out: Path = typer.Option(..., "--out", "-o", metavar="DIR", help="Directory for the Parquet traces."),
        batch_sizes: str = typer.Option("4,8,16", "--batch-sizes", metavar="LIST",
                                        help="Comma-separated batch sizes to replay (sizes above the number of "
                                             "prompts are capped to it)."),
        max_new_tokens: int = options.MAX_NEW,
        seed: int = typer.Option(0, "--seed", help="Seeds which prompts share a batch (and torch)."),
        modes: str = typer.Option("sync,free", "--modes", metavar="LIST",
                                  help="sync (teacher-forced), free (free-running), or both."),
        resume: bool = typer.Option(False, "--resume", help="Continue an interrupted scan in --out (new "
                                    "--batch-sizes are added to it)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Delete the traces an earlier scan wrote in --out "
                                       "first (other files are never deleted)."),
        skip_long: bool = options.SKIP_LONG,
        prefix_cache: bool = endpoint_cli.PREFIX_CACHE,
        **shared,
    ) -> None:
        """Replay PROMPTS solo and inside batches; record tokens, top-1/top-2 logits, margins and flips."""
        from ..scan import ScanConfig, parse_batch_sizes, scan

        o = options.Shared(shared)
        if o.endpoint:
            return endpoint_cli.scan(ctx, prompts=prompts, out=out, endpoint=o.endpoint, model=o.model,
                                     batch_sizes=parse_batch_sizes(batch_sizes), max_new_tokens=max_new_tokens,
                                     seed=seed, limit=o.limit, chat=not o.no_chat, tokens_only=o.tokens_only,
                                     prefix_cache=prefix_cache, engine_note=o.engine_note, timeout=o.timeout,
                                     retries=o.retries, resume=resume, overwrite=overwrite, quiet=o.quiet,
                                     json_out=o.json_out)

        config = ScanConfig(
            prompts=prompts, out=out, model=o.model, dtype=o.dtype, device=o.device,
            batch_sizes=parse_batch_sizes(batch_sizes), max_new_tokens=max_new_tokens, seed=seed,
            limit=o.limit, chat=not o.no_chat, modes=[m for m in modes.split(",") if m],
            attn_implementation=o.attn, resume=resume, overwrite=overwrite, skip_long=skip_long,
        )
        quiet, json_out = o.quiet, o.json_out
        with console.reporter(quiet) as report:
            result = scan(config, progress=report, log=console.logger(quiet))
        if json_out:
            console.print_json(result.summary)
        else:
            render_summary(result.summary, result.out)
