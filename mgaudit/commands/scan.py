"""``mgaudit scan``: decode prompts alone and under load, record every step into Parquet."""

from __future__ import annotations

from pathlib import Path

import typer

from ..audit.sweep import AXES as SWEEP_AXES
from ..errors import UsageError
from . import console, options, render
from .boundary import guarded

#: New tokens per request of a sweep where --max-new-tokens is not given (long generations).
SWEEP_NEW_TOKENS = 256


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
    sweep: bool = typer.Option(False, "--sweep",
                               help="With --endpoint: the server's determinism card. Sweeps requests in flight "
                                    "(together and staggered, bisecting to the onset), cold vs warm prompt cache, "
                                    "long prompts, the chat route, each for --rounds rounds; writes _card.json, "
                                    "_card.md and _card.png into --out beside the traces (--max-new-tokens defaults "
                                    "to 256 here)."),
    rounds: int = typer.Option(3, "--rounds", metavar="N", help="With --sweep: rounds per level (each draws its "
                               "groups anew; alone, they tell run-to-run from batch-to-batch differences)."),
    max_concurrency: int = typer.Option(None, "--max-concurrency", metavar="N",
                                        help="With --sweep: the highest level of requests in flight (default: the "
                                             "server's slots where it says, else 64)."),
    axes: str = typer.Option(",".join(SWEEP_AXES), "--axes", metavar="LIST",
                             help="With --sweep: which axes to run, of " + ", ".join(SWEEP_AXES) + "."),
    long_prompt_tokens: int = typer.Option(1024, "--long-prompt-tokens", metavar="N",
                                           help="With --sweep: the context put before each prompt on the depth "
                                                "axis, in tokens."),
    **shared,
) -> None:
    """Decode PROMPTS alone and under load; record tokens, top-1/top-2 logits, margins and flips.

    The reference is each prompt alone (on the candidate's backend, or the one --reference names);
    the candidate is the local model in padded batches, or the --endpoint server with requests in flight.
    """
    from ..audit.sweep import SweepSpec, parse_axes
    from ..scan import ScanConfig, parse_batch_sizes, scan

    o = options.Shared(shared)
    spec = None
    if sweep:
        spec = SweepSpec(rounds=rounds, max_concurrency=max_concurrency, axes=parse_axes(axes),
                         long_prompt_tokens=long_prompt_tokens)
        if options.explicit(ctx, "batch_sizes"):
            raise UsageError("`batch_sizes` and `sweep` exclude each other: the sweep chooses its levels",
                             hint="set the highest with `max_concurrency`")
        if not options.explicit(ctx, "max_new_tokens"):
            max_new_tokens = SWEEP_NEW_TOKENS
    else:
        unused = [f"`{n}`" for n in ("rounds", "max_concurrency", "axes", "long_prompt_tokens") if options.explicit(ctx, n)]
        if unused:
            raise UsageError(f"{', '.join(unused)} apply to a sweep", hint="give `sweep` too")
    config = ScanConfig(prompts=prompts, out=out, batch_sizes=parse_batch_sizes(batch_sizes),
                        max_new_tokens=max_new_tokens, seed=seed, limit=o.limit, chat=not o.no_chat,
                        modes=[m for m in modes.split(",") if m], resume=resume, overwrite=overwrite,
                        skip_long=skip_long, prefix_cache=prefix_cache, sweep=spec, **options.audit_options(ctx, o))
    with console.reporter(o.quiet) as report:
        result = scan(config, progress=report, log=console.logger(o.quiet))
    if o.json_out:
        console.print_json(result.card.to_dict() if result.card is not None else result.summary)
    elif result.card is not None:
        render.card_summary(result.card, result.out)
    else:
        render.scan_summary(result.summary, result.out)


def register(app: typer.Typer) -> None:
    app.command("scan")(scan_cmd)
