"""``mgaudit diagnose ops|prompt|kv``: which kernel makes the stack batch-variant."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from . import console
from . import options
from .boundary import guarded

THREADS = typer.Option(None, "--threads", help="torch CPU threads (kernels can depend on it); default: torch's.")
#: parameters every diagnose subcommand ends with; CHAT where it reads prompts (see options.takes)
TAIL = (("threads", int, THREADS), ("json_out", bool, options.JSON))
CHAT = (("no_chat", bool, options.NO_CHAT),)


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return "0" if x == 0 else f"{x:.2g}"


def _log(message: str) -> None:
    console.err.print(escape(message))


def _run_and_render(config, run, render, json_out: bool) -> None:
    """Check the config, run the diagnosis, print its JSON or its tables."""
    config.validate()
    result = run(config, log=_log)
    if json_out:
        console.print_json(result.to_dict())
    else:
        render(result)


def render_ops(report) -> None:
    table = Table(title=f"diagnose ops: {report.model} ({report.dtype}, {report.device}, "
                        f"{report.torch_threads} threads)", title_justify="left")
    table.add_column("op (each row vs itself at batch 1)", overflow="fold", max_width=34)
    for m in report.row_counts:
        table.add_column(f"M={m}", justify="right")
    table.add_column("first ≠", justify="right")
    for op in report.ops:
        cells = []
        for p in op.points:
            cells.append("[green]=[/]" if p.identical else f"[red]≠{_fmt(p.max_abs_diff)}[/]")
        table.add_row(escape(op.name), *cells, "-" if op.first_diff is None else str(op.first_diff))
    console.out.print(table)
    console.out.print("= : every one of the M rows bit-identical to that row alone (torch.equal); "
                      "≠x : some row differs, max |diff| x. For 'attention cache' M-1 is the number of "
                      "masked positions added to one row's K/V.")
    console.out.print(f"[bold]verdict:[/] {escape(report.verdict)}")
    lim = getattr(report, "limits", None)
    if lim:
        t = Table(title=f"row limits the ragged path plans with (each row count 2..{lim['up_to']}: "
                        f">= {lim['min_elements_per_row_count']} elements compared; {lim['detects']})",
                  title_justify="left")
        t.add_column("op")
        layouts = sorted({k for v in lim["ops"].values() for k in v})
        for layout in layouts:
            t.add_column(f"limit, {layout}", justify="right")
        for key, per in lim["ops"].items():
            t.add_row(escape(key), *[str(per.get(layout, "-")) for layout in layouts])
        console.out.print(t)
        if lim.get("limited"):
            console.out.print("limited below the probe's range: " + escape(", ".join(
                f"{k} (first differs at M={v['first_failure']}; runs {v['best']}, up to {v['limit']} rows)"
                for k, v in lim["limited"].items())))


def render_prompt(rep) -> None:
    table = Table(title=f"diagnose prompt: {rep.prompt_id} ({rep.prompt_len} tokens) in a batch of "
                        f"{rep.batch_size}, row {rep.row}, left padding {rep.pad_len}", title_justify="left")
    for col in ("step", "first divergent", "layers ≠", "last layer max |Δ|", "logits max |Δ|",
                "solo argmax", "batched argmax", "flip"):
        table.add_column(col, justify="right")
    for s in rep.steps:
        n_bad = sum(d > 0 for d in s.layer_max_abs_diff)
        where = "-" if s.first_layer is None else f"layer {s.first_layer} {s.first_block}"
        table.add_row("prefill" if s.step < 0 else str(s.step), where, f"{n_bad}/{rep.n_layers}",
                      _fmt(s.layer_max_abs_diff[-1]), _fmt(s.logits_max_abs_diff), str(s.solo_argmax),
                      str(s.batched_argmax), "[red]yes[/]" if s.flipped else "")
    console.out.print(table)
    console.out.print(f"[bold]verdict:[/] {escape(rep.verdict)}")


def render_kv(run) -> None:
    results = run.results
    table = Table(title="diagnose kv: solo vs batched K/V cache, teacher-forced", title_justify="left")
    for col in ("prompt", "tokens", "pad", "steps", "first flip", "deepest K |Δ| slope/token", "trend",
                "newest-column slope"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(escape(str(r.prompt_id)), str(r.prompt_len), str(r.pad_len), str(len(r.steps)),
                      "-" if r.flipped_at_step is None else str(r.flipped_at_step), _fmt(r.slope),
                      r.trend or "-", _fmt(r.slope_new))
    console.out.print(table)
    first = next((r for r in results if r.flipped_at_step is not None), None)
    if first is not None:
        nl = first.n_layers
        layers = sorted({0, nl // 3, (2 * nl) // 3, nl - 1})
        lead = Table(title=f"{first.prompt_id}: K (and deepest V) max |Δ| on valid positions, steps up to the "
                           f"first flip", title_justify="left")
        lead.add_column("step", justify="right")
        for layer in layers:
            lead.add_column(f"K L{layer}", justify="right")
        lead.add_column(f"V L{nl - 1}", justify="right")
        lead.add_column("flip", justify="right")
        for i in first.leading_up(8):
            lead.add_row("prefill" if first.steps[i] < 0 else str(first.steps[i]),
                         *[_fmt(first.k_max_abs_diff[i][layer]) for layer in layers],
                         _fmt(first.v_max_abs_diff[i][nl - 1]), "[red]yes[/]" if first.flips[i] else "")
        console.out.print(lead)
    console.out.print(f"wrote {run.summary['files']['parquet']} and {run.summary['files']['plot']}")
    console.out.print(f"[bold]verdict:[/] {escape(run.summary['verdict'])}")


@guarded
@options.takes(options.STACK, TAIL)
def ops_cmd(
    rows: str = typer.Option(None, "--rows", help="Comma-separated row counts M to probe (default: 1 to 256, "
                                                 "around the thresholds CPU and GPU kernels switch at)."),
    kv_len: int = typer.Option(48, "--kv-len", help="K/V cache length of the attention probes."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random probe inputs."),
    **shared,
) -> None:
    """Probe every op (Linear shapes, RMSNorm, rotary, sdpa) for bit-identity to batch 1 as M grows."""
    from ..diagnose.run import DEFAULT_ROWS, OpsConfig, parse_rows, run_ops

    o = options.Shared(shared)
    config = OpsConfig(model=o.model, dtype=o.dtype, device=o.device, rows=parse_rows(rows) if rows is not None else DEFAULT_ROWS,
                       seed=seed,
                       kv_len=kv_len, attn_implementation=o.attn, threads=o.threads)
    _run_and_render(config, run_ops, render_ops, o.json_out)


@guarded
@options.takes(options.STACK, CHAT, TAIL)
def prompt_cmd(
    prompt: str = typer.Argument(..., help="A prompt id of --prompts, or the text of a prompt."),
    prompts: str = typer.Option("chat", "--prompts", help="Prompt set to take the prompt and the fillers from."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", help="Rows of the batch (the prompt and fillers)."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="Tokens to generate (steps incl. prefill)."),
    row: int = typer.Option(0, "--row", help="Row of the batch that holds the prompt."),
    exact: bool = typer.Option(False, "--exact", help="Batch of copies of the prompt: equal lengths, no padding."),
    **shared,
) -> None:
    """Per step, the first layer and block (attention/MLP) where the batched row leaves solo."""
    from ..diagnose.run import PromptConfig, run_prompt

    o = options.Shared(shared)
    config = PromptConfig(prompt=prompt, prompts=prompts, model=o.model, dtype=o.dtype, device=o.device,
                          batch_size=batch_size, max_new_tokens=max_new_tokens, row=row, exact=exact,
                          chat=not o.no_chat, attn_implementation=o.attn, threads=o.threads)
    _run_and_render(config, run_prompt, render_prompt, o.json_out)


@guarded
@options.takes(options.STACK, CHAT, TAIL)
def kv_cmd(
    prompts: str = options.PROMPTS_ARG,
    out: Path = typer.Option(..., "--out", "-o", help="Directory for kv.parquet and kv.png."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", help="Rows of each batch."),
    max_new_tokens: int = options.MAX_NEW,
    limit: int = typer.Option(None, "--limit", help="Probe only the first N prompts (fillers still come from "
                                                    "the whole set)."),
    flips: int = typer.Option(3, "--flips", help="Stop after this many prompts with an argmax flip."),
    plot: Path = typer.Option(None, "--plot", help="Where to write the PNG (default OUT/kv.png)."),
    **shared,
) -> None:
    """Solo vs batched K/V caches per layer and step, until argmax flips are found; slope of the drift."""
    from ..diagnose.run import KvConfig, run_kv

    o = options.Shared(shared)
    config = KvConfig(prompts=prompts, out=out, model=o.model, dtype=o.dtype, device=o.device,
                      batch_size=batch_size, max_new_tokens=max_new_tokens, limit=limit, flips=flips, plot=plot,
                      chat=not o.no_chat, attn_implementation=o.attn, threads=o.threads)
    config.validate()

    def on_prompt(r: Any) -> None:
        console.err.print(escape(f"{r.prompt_id}: {r.verdict}"))

    run = run_kv(config, log=_log, on_prompt=on_prompt)
    if o.json_out:
        console.print_json(run.summary)
    else:
        render_kv(run)


def register(app: typer.Typer) -> None:
    sub = typer.Typer(name="diagnose", no_args_is_help=True,
                      help="Find which kernel makes the stack batch-variant: op probe, layer locator, K/V drift.")
    app.add_typer(sub, name="diagnose")
    sub.command("ops")(ops_cmd)
    sub.command("prompt")(prompt_cmd)
    sub.command("kv")(kv_cmd)
