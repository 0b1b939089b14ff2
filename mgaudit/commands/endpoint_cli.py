"""``--endpoint`` for ``scan`` and ``verify``: options, the calls into :mod:`mgaudit.endpoint`, rendering.

The commands keep their own options; where ``--endpoint URL`` is given they hand
over to :func:`scan` or :func:`verify` here. ``--model`` then names a tokenizer only
when given explicitly (mgaudit applies the chat template and sends token ids to
``/v1/completions``); by default chat prompts go to ``/v1/chat/completions``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from . import console
from ..errors import UsageError

ENDPOINT = typer.Option(None, "--endpoint", metavar="URL",
                        help="Audit a running OpenAI-compatible server instead of a local model: its base URL, "
                             "e.g. http://127.0.0.1:8080/v1 (API key from $MGAUDIT_API_KEY or $OPENAI_API_KEY). "
                             "Each request alone vs while B-1 others are in flight.")
ENGINE_NOTE = typer.Option(None, "--engine-note", metavar="TEXT",
                           help="With --endpoint: free text stored in the provenance (engine version, flags).")
TOKENS_ONLY = typer.Option(False, "--tokens-only",
                           help="With --endpoint: for servers without logprobs; flips and divergence without "
                                "margins (calibrate refuses such traces).")
PREFIX_CACHE = typer.Option(False, "--prefix-cache",
                            help="With --endpoint on llama.cpp: also compare each request with a warm prompt cache "
                                 "against the cold solo run (rows with batch_size 1, mode free/sync).")
TIMEOUT = typer.Option(120.0, "--timeout", metavar="S", help="With --endpoint: seconds per request before a retry.")
RETRIES = typer.Option(3, "--retries", metavar="N", help="With --endpoint: retries per request (timeouts, 5xx, 429).")
#: The endpoint client's parameters, for scan and verify (see options.takes).
CLIENT = (("endpoint", str, ENDPOINT), ("engine_note", str, ENGINE_NOTE), ("tokens_only", bool, TOKENS_ONLY),
          ("timeout", float, TIMEOUT), ("retries", int, RETRIES))


def tokenizer_spec(ctx: typer.Context, model: str) -> str | None:
    """``--model`` only when given on the command line (its default names no tokenizer here)."""
    src = ctx.get_parameter_source("model")  # an enum of click, or of the click that typer vendors
    return None if src is None or getattr(src, "name", "") in ("DEFAULT", "DEFAULT_MAP") else model


def _rewrap(exc: Exception) -> Exception:
    from ..endpoint.client import NoLogprobsError

    if isinstance(exc, NoLogprobsError):
        return UsageError(exc.message, hint="pass --tokens-only to audit flips and divergence without margins")
    return exc


def scan(ctx: typer.Context, *, prompts: str, out: Path, endpoint: str, model: str, batch_sizes: list[int],
         max_new_tokens: int, seed: int, limit: int | None, chat: bool, tokens_only: bool, prefix_cache: bool,
         engine_note: str | None, timeout: float, retries: int, resume: bool, overwrite: bool, quiet: bool,
         json_out: bool) -> None:
    from ..endpoint import EndpointScanConfig, scan_endpoint
    from ..endpoint.client import NoLogprobsError

    config = EndpointScanConfig(prompts=prompts, out=out, endpoint=endpoint, tokenizer=tokenizer_spec(ctx, model),
                                batch_sizes=batch_sizes, max_new_tokens=max_new_tokens, seed=seed, limit=limit,
                                chat=chat, tokens_only=tokens_only, prefix_cache=prefix_cache,
                                engine_note=engine_note, timeout=timeout, retries=retries, resume=resume,
                                overwrite=overwrite)
    try:
        with console.reporter(quiet) as report:
            result = scan_endpoint(config, progress=report, log=console.logger(quiet))
    except NoLogprobsError as exc:
        raise _rewrap(exc) from None
    if json_out:
        console.print_json(result.summary)
    else:
        render_scan(result.summary, result.out)


def render_scan(summary: dict[str, Any], out: Path) -> None:
    from .scan import render_summary

    render_summary(summary, out)
    ep = summary.get("endpoint") or {}
    t = Table(title=f"requests ({summary['provenance']['model'].get('engine', 'server')})")
    for col in ("kind", "B", "requests", "req/s", "tokens/s", "short", "retried"):
        t.add_column(col, justify="right")
    for u in ep.get("units", []):
        t.add_row(u["kind"], str(u["batch_size"]), str(u["requests"]),
                  f"{u['requests_per_second']:.2f}" if u["requests_per_second"] else "-",
                  f"{u['tokens_per_second']:.1f}" if u["tokens_per_second"] else "-",
                  str(u["short_sequences"]), str(u["retried_requests"]))
    console.out.print(t)
    pc = ep.get("prefix_cache")
    if pc:
        console.out.print(f"prefix cache: warm vs cold, {pc['sequences_diverged']}/{pc['sequences']} sequences "
                          f"diverged (median cached prompt tokens when warm: {pc['warm_cached_tokens_median']})")
    prec = ep.get("logprob_precision") or {}
    if prec.get("reading"):
        console.out.print(f"logprobs from the server: {prec['reading']}; token ids: {ep.get('token_ids')}")


def verify(ctx: typer.Context, *, prompts: str, endpoint: str, model: str, batch_size: int, max_new_tokens: int,
           limit: int | None, chat: bool, tokens_only: bool, engine_note: str | None, timeout: float, retries: int,
           report: Path | None, quiet: bool, json_out: bool) -> int:
    from ..endpoint import EndpointVerifyConfig, verify_endpoint
    from ..endpoint.client import NoLogprobsError

    config = EndpointVerifyConfig(prompts=prompts, endpoint=endpoint, tokenizer=tokenizer_spec(ctx, model),
                                  batch_size=batch_size, max_new_tokens=max_new_tokens, limit=limit, chat=chat,
                                  tokens_only=tokens_only, engine_note=engine_note, timeout=timeout,
                                  retries=retries, report=report)
    try:
        with console.reporter(quiet) as progress:
            result = verify_endpoint(config, progress=progress, log=console.logger(quiet))
    except NoLogprobsError as exc:
        raise _rewrap(exc) from None
    if json_out:
        console.print_json(result)
    else:
        render_verify(result)
    if report and not quiet:
        console.say(f"report written to {report}")
    return 0 if result["summary"]["all_identical"] else 1


def render_verify(report: dict[str, Any]) -> None:
    s, pol = report["summary"], report["policy"]
    table = Table(title=f"verify: {pol['engine']} at {pol['endpoint']}, {pol['batch_size']} requests in flight")
    for col in ("sequences identical to solo", "solo s", "under load s", "solo tok/s", "under load tok/s",
                "short", "retries"):
        table.add_column(col, justify="right")

    def f(x, spec=".1f"):
        return "-" if x is None else format(x, spec)

    table.add_row(f"{s['identical']}/{s['sequences']}", f(s["solo_seconds"]), f(s["loaded_seconds"]),
                  f(s["solo_tokens_per_second"]), f(s["loaded_tokens_per_second"]), str(s["short_sequences"]),
                  str(s["retries"]))
    console.out.print(table)
    bad = [r for r in report["sequences"] if not r["identical"]]
    if bad:
        t = Table(title="sequences that differ from solo")
        for col in ("prompt", "first divergent step", "solo token", "under load", "solo margin", "margin under load"):
            t.add_column(col)
        for r in bad:
            def fmt(x):
                return "-" if x is None else f"{x:.4g}"

            def tok(text, tid):
                return escape(repr(text)) if text is not None else str(tid)
            t.add_row(escape(r["prompt_id"]), str(r["first_divergence"]), tok(r.get("solo_text"), r.get("solo_token")),
                      tok(r.get("loaded_text"), r.get("loaded_token")), fmt(r.get("solo_margin")),
                      fmt(r.get("loaded_margin")))
        console.out.print(t)
        console.out.print(f"[bold red]FAIL[/]: {len(bad)} of {s['sequences']} sequences under load differ from solo")
    else:
        console.out.print(f"[bold green]PASS[/]: all {s['sequences']} sequences under load identical to solo")
