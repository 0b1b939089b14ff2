"""``mgaudit verify``: is the candidate's output the reference's, and if not, noise or anomaly (a CI gate)."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import UsageError
from . import console, options, render
from .boundary import guarded


@guarded
@options.takes(options.STACK, options.SELECTION, options.AUDIT, options.SAMPLING, options.OUTPUT)
def verify_cmd(
    ctx: typer.Context,
    prompts: str = options.PROMPTS_ARG,
    strict: bool = typer.Option(False, "--strict", help="Refuse a gate fitted on another model, dtype, device "
                                "kind or attention implementation (default: warn)."),
    policy: str = typer.Option(None, "--policy", metavar="POLICY",
                               help="The local model's decoding: none (plain padded batching), always (verify "
                                    "every step), gate (verify below tau; the default), invariant (batch-invariant "
                                    "path, no verifier)."),
    fast_path: str = typer.Option("ragged", "--fast-path", metavar="PATH",
                                  help="gate's fast path: ragged (solo prefill, unpadded attention) or padded "
                                       "(the paper's design: padded batch, verified below tau)."),
    max_rows: int = typer.Option(None, "--max-rows", metavar="N", help="GEMM rows per chunk on the ragged path "
                                 "(default: measured on the model)."),
    batch_size: int = typer.Option(16, "--batch-size", "-b", metavar="N",
                                   help="Prompts decoded together, or requests in flight on a server."),
    contract: str = typer.Option("solo", "--contract", metavar="CONTRACT",
                                 help="solo: identical to stock solo decoding (generate at batch size 1); "
                                      "batch-invariant: kernels whose result for a prompt does not depend on the "
                                      "batch (fixed-size GEMMs, packed prefill, padded attention), checked "
                                      "against the prompt alone through them."),
    audit_every: int = typer.Option(None, "--audit-every", metavar="K",
                                    help="gate: check every row bit for bit at batch size 1 at least every K "
                                         "steps, whatever its margin (default 16)."),
    fail_on: str = typer.Option("any", "--fail-on", metavar="any|anomalous",
                                help="any: every difference fails (exit 1, or 4 if anomalous); anomalous: only "
                                     "anomalous differences fail (exit 4; differences within noise exit 0)."),
    no_teacher_forcing: bool = typer.Option(False, "--no-teacher-forcing",
                                            help="Skip scoring diverged sequences on the reference's tokens."),
    seed: int = options.SEED,
    max_new_tokens: int = options.MAX_NEW,
    report: Path = typer.Option(None, "--report", metavar="FILE",
                                help="Write the full report (per-sequence records, token lists, every "
                                     "difference) as JSON."),
    skip_long: bool = options.SKIP_LONG,
    card: Path = typer.Option(None, "--card", metavar="FILE",
                              help="With --endpoint: check a determinism card (_card.json of `scan --sweep`): "
                                   "the server must still be identical to alone up to the card's level of requests "
                                   "sent together (which sets --batch-size); --strict refuses a card measured on "
                                   "another engine, version, slot count, prefix-cache setting or model."),
    **shared,
) -> None:
    """Decode PROMPTS alone (the reference) and under a policy or load (the candidate); compare.

    Exit codes: 0 all identical; 1 some differ, none anomalous; 4 some difference is anomalous (the
    reference's margin >= tau); 2 bad input; 3 internal error (a bug); 130/143 interrupted.
    """
    from ..verify import VerifyConfig, exit_code, verify

    o = options.Shared(shared)
    if card is not None and options.explicit(ctx, "batch_size"):
        raise UsageError("`card` and `batch_size` exclude each other: the card's expectation sets the batch size")
    config = VerifyConfig(prompts=prompts, policy=policy, fast_path=fast_path, max_rows=max_rows,
                          batch_size=batch_size, max_new_tokens=max_new_tokens, limit=o.limit, chat=not o.no_chat,
                          report=report, strict=strict, skip_long=skip_long, contract=contract,
                          audit_every=audit_every, fail_on=fail_on, teacher_forced=not no_teacher_forcing,
                          seed=seed, card=card, **options.audit_options(ctx, o))
    with console.reporter(o.quiet) as progress:
        result = verify(config, progress=progress, log=console.logger(o.quiet))
    if o.json_out:
        console.print_json(result)
    else:
        render.verify_report(result)
    if report and not o.quiet:
        console.say(f"report written to {report}")
    raise typer.Exit(exit_code(result, fail_on))


def register(app: typer.Typer) -> None:
    app.command("verify")(verify_cmd)
