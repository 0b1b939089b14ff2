"""``mgaudit verify``: gated decoding must reproduce the solo output exactly (a CI gate)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from . import console
from ..errors import UsageError
from . import endpoint_cli, options
from .boundary import guarded


def render(report: dict[str, Any]) -> None:
    s, pol = report["summary"], report["policy"]
    tau = "-" if pol["threshold"] is None else f"{pol['threshold']!r}"  # stored as the shortest float32 decimal
    name = pol["name"] + (f" (tau={tau}, {pol['fast_path']} fast path)" if pol["name"] == "gate" else "")
    ref = "solo" if s.get("contract", "solo") == "solo" else "the batch-invariant reference"
    table = Table(title=f"verify: policy {name}, batch size {pol['batch_size']}, contract {s.get('contract', 'solo')}")
    table.add_column(f"sequences identical to {ref}", justify="right")
    table.add_column("trigger rate", justify="right")
    table.add_column("mismatches repaired", justify="right")
    table.add_column("solo s", justify="right")
    table.add_column("policy s", justify="right")
    table.add_column("speed-up vs solo", justify="right")
    table.add_row(f"{s['identical']}/{s['sequences']}", f"{100 * s['trigger_rate']:.1f}%", str(s["repairs"]),
                  f"{s['solo_seconds']:.1f}", f"{s['policy_seconds']:.1f}",
                  f"{s['speedup_vs_solo']:.2f}x" if s["speedup_vs_solo"] else "-")
    console.out.print(table)
    if s.get("plan"):
        console.out.print("fast path plan: " + escape(", ".join(f"{k}: {v}" for k, v in s["plan"].items())))
    drift = report.get("drift") or []
    if drift:
        t = Table(title="drift events (fast path != batch-1 recomputation, bit for bit)")
        for col in ("prompt", "step", "what differed", "replayed from step", "op found", "rows it ran",
                    "op now runs"):
            t.add_column(col)
        for e in drift:
            t.add_row(escape(e["prompt_id"]), str(e["step"]), e["what"], str(e["replayed_from"]),
                      escape(e["op"] or "not attributed"), str(e["rows"] or "-"), escape(e["lowered_to"] or "-"))
        console.out.print(t)
    if s.get("exactness"):
        console.out.print("checked: " + escape(s["exactness"]))
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
                      escape(repr(r["solo_text"])), escape(repr(r["policy_text"])),
                      fmt(r["solo_margin"]), fmt(r["policy_margin"]), str(r["verified_at_divergence"]))
        console.out.print(t)
        console.out.print(f"[bold red]FAIL[/]: {len(bad)} of {s['sequences']} sequences differ from {ref}")
    else:
        console.out.print(f"[bold green]PASS[/]: all {s['sequences']} sequences identical to {ref}")


def register(app: typer.Typer) -> None:
    @app.command("verify")
    @guarded
    @options.takes(options.STACK, options.SELECTION, endpoint_cli.CLIENT, options.OUTPUT)
    def verify_cmd(
        ctx: typer.Context,
        prompts: str = options.PROMPTS_ARG,
        gate: Path = typer.Option(None, "--gate", metavar="FILE", help="gate.json written by `mgaudit calibrate`."),
        threshold: float = typer.Option(None, "--threshold", metavar="TAU",
                                        help="Gate threshold tau (instead of --gate; a float32 number)."),
        strict: bool = typer.Option(False, "--strict", help="Refuse a gate fitted on another model, dtype, device "
                                    "kind or attention implementation (default: warn)."),
        policy: str = typer.Option("gate", "--policy", metavar="POLICY",
                                   help="none (plain padded batching), always (verify every step), "
                                        "gate (verify below tau), invariant (batch-invariant path, no verifier)."),
        fast_path: str = typer.Option("ragged", "--fast-path", metavar="PATH",
                                      help="gate's fast path: ragged (solo prefill, unpadded attention) or padded "
                                           "(the paper's design: padded batch, verified below tau)."),
        max_rows: int = typer.Option(None, "--max-rows", metavar="N", help="GEMM rows per chunk on the ragged path "
                                                               "(default: measured on the model)."),
        batch_size: int = typer.Option(16, "--batch-size", "-b", metavar="N", help="Prompts decoded together."),
        contract: str = typer.Option("solo", "--contract", metavar="CONTRACT",
                                     help="solo: identical to stock solo decoding (generate at batch size 1); "
                                          "batch-invariant: kernels whose result for a prompt does not depend on the "
                                          "batch (fixed-size GEMMs, packed prefill, padded attention), checked "
                                          "against the prompt alone through them."),
        audit_every: int = typer.Option(None, "--audit-every", metavar="K",
                                        help="gate: check every row bit for bit at batch size 1 at least every K "
                                             "steps, whatever its margin (default 16)."),
        max_new_tokens: int = options.MAX_NEW,
        report: Path = typer.Option(None, "--report", metavar="FILE",
                                    help="Write the full report (per-sequence records and token lists) as JSON."),
        skip_long: bool = options.SKIP_LONG,
        **shared,
    ) -> None:
        """Decode PROMPTS solo and under a policy; exit 0 only if every sequence is identical to solo.

        With --endpoint: each request alone vs with --batch-size requests in flight on that server.
        Exit codes: 0 all identical, 1 some differ, 2 bad input, 3 internal error (a bug), 130/143 interrupted.
        """
        from ..verify import VerifyConfig, verify

        o = options.Shared(shared)
        if o.endpoint:
            if gate is not None or threshold is not None:
                raise UsageError("--gate/--threshold do not apply with --endpoint (a server's batching is audited "
                                 "as it is)", hint="drop --gate/--threshold, or drop --endpoint")
            raise typer.Exit(endpoint_cli.verify(
                ctx, prompts=prompts, endpoint=o.endpoint, model=o.model, batch_size=batch_size,
                max_new_tokens=max_new_tokens, limit=o.limit, chat=not o.no_chat, tokens_only=o.tokens_only,
                engine_note=o.engine_note, timeout=o.timeout, retries=o.retries, report=report, quiet=o.quiet,
                json_out=o.json_out))

        config = VerifyConfig(prompts=prompts, model=o.model, dtype=o.dtype, device=o.device, policy=policy,
                              gate=gate, threshold=threshold, fast_path=fast_path, max_rows=max_rows,
                              batch_size=batch_size, max_new_tokens=max_new_tokens, limit=o.limit, chat=not o.no_chat,
                              attn_implementation=o.attn, report=report, strict=strict, skip_long=skip_long,
                              contract=contract, audit_every=audit_every)
        with console.reporter(o.quiet) as progress:
            result = verify(config, progress=progress, log=console.logger(o.quiet))
        if o.json_out:
            console.print_json(result)
        else:
            render(result)
        if report and not o.quiet:
            console.say(f"report written to {report}")
        raise typer.Exit(0 if result["summary"]["all_identical"] else 1)
