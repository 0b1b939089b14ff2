"""``mgaudit scan``: decode prompts alone and under load, record every step into Parquet."""

from __future__ import annotations

from pathlib import Path

import typer

from . import console, options, render
from .boundary import guarded


@guarded
@options.takes(options.STACK, options.SELECTION, options.AUDIT, options.SAMPLING, options.OUTPUT)
def scan_cmd(
    ctx: typer.Context,
    prompts: str = options.PROMPTS_ARG,
    out: Path = typer.Option(..., "--out", "-o", metavar="DIR", help="Directory for the Parquet traces."),
    batch_sizes: str = typer.Option("4,8,16", "--batch-sizes", metavar="LIST",
                                    help="Comma-separated batch sizes (rows decoded together, or requests in "
                                         "flight on a server); sizes above the number of prompts are capped to it."),
    max_new_tokens: int = options.MAX_NEW,
    seed: int = options.SEED,
    modes: str = typer.Option("sync,free", "--modes", metavar="LIST",
                              help="sync (teacher-forced), free (free-running), or both."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted scan in --out (new "
                                "--batch-sizes are added to it)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete the traces an earlier scan wrote in --out "
                                   "first (other files are never deleted)."),
    skip_long: bool = options.SKIP_LONG,
    prefix_cache: bool = typer.Option(False, "--prefix-cache",
                                      help="With --endpoint on llama.cpp: also each prompt alone with a warm prompt "
                                           "cache (condition warm-cache)."),
    **shared,
) -> None:
    """Decode PROMPTS alone and under load; record tokens, top-1/top-2 logits, margins and flips.

    The reference is each prompt alone (on the candidate's backend, or the one --reference names);
    the candidate is the local model in padded batches, or the --endpoint server with requests in flight.
    """
    from ..scan import ScanConfig, parse_batch_sizes, scan

    o = options.Shared(shared)
    config = ScanConfig(prompts=prompts, out=out, batch_sizes=parse_batch_sizes(batch_sizes),
                        max_new_tokens=max_new_tokens, seed=seed, limit=o.limit, chat=not o.no_chat,
                        modes=[m for m in modes.split(",") if m], resume=resume, overwrite=overwrite,
                        skip_long=skip_long, prefix_cache=prefix_cache, **options.audit_options(ctx, o))
    with console.reporter(o.quiet) as report:
        result = scan(config, progress=report, log=console.logger(o.quiet))
    if o.json_out:
        console.print_json(result.summary)
    else:
        render.scan_summary(result.summary, result.out)


def register(app: typer.Typer) -> None:
    app.command("scan")(scan_cmd)
