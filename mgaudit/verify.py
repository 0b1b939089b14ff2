"""``verify``: decode prompts solo and under a policy; are the outputs identical?

The solo run (batch size 1, greedy, exactly what ``generate`` gives for a prompt
alone) is the reference. The policy run decodes the same prompts in batches.
The result says, per sequence, whether the token sequences are identical and,
where not, where and how they part; the CLI exits 0 only if all are identical.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from .models import ModelOptions
from .errors import GateMismatchError, UsageError
from .decoding.policies import AUDIT_EVERY, CONTRACTS, FAST_PATHS, POLICIES, DecodePolicy, decode, reference_decode
from .progress import Stage, as_callback
from .formats.traces import check_output_file
from .formats.provenance import run_provenance
from .formats.report import VerifyReport



@dataclass
class VerifyConfig(ModelOptions):
    prompts: str
    policy: str = "gate"
    gate: Path | None = None
    threshold: float | None = None
    fast_path: str = "ragged"
    max_rows: int | None = None
    batch_size: int = 16
    max_new_tokens: int = 64
    limit: int | None = None
    chat: bool = True
    report: Path | None = None
    strict: bool = False  # refuse a gate fitted on another stack (model, dtype, device kind, attention)
    skip_long: bool = False  # skip prompts that do not fit the context (else: ContextLengthError)
    contract: str = "solo"  # solo: identical to stock solo decoding; batch-invariant: to its own batch-1 run
    audit_every: int | None = None  # gate: check each row at batch size 1 at least every K steps (None: default)

    def validate(self) -> None:
        if self.policy not in POLICIES:
            raise UsageError(f"`policy` {self.policy!r} is not one of {', '.join(POLICIES)}")
        if self.batch_size < 1:
            raise UsageError(f"`batch_size` {self.batch_size} must be at least 1")
        if self.fast_path not in FAST_PATHS:
            raise UsageError(f"`fast_path` {self.fast_path!r} is not one of {', '.join(FAST_PATHS)}")
        if self.max_rows is not None and self.max_rows < 1:
            raise UsageError(f"`max_rows` {self.max_rows} must be at least 1")
        if self.contract not in CONTRACTS:
            raise UsageError(f"`contract` {self.contract!r} is not one of {', '.join(CONTRACTS)}")
        if self.audit_every is not None and self.audit_every < 1:
            raise UsageError(f"`audit_every` {self.audit_every} must be at least 1")
        if self.max_new_tokens < 1:
            raise UsageError(f"`max_new_tokens` {self.max_new_tokens} must be at least 1")
        if self.gate is not None and self.threshold is not None:
            raise UsageError("`gate` and `threshold` exclude each other")
        if self.policy == "gate" and self.gate is None and self.threshold is None:
            raise UsageError("`policy` gate needs `gate` gate.json or `threshold` TAU",
                             hint="or choose `policy` none, always or invariant")
        if self.threshold is not None and not self.threshold >= 0:
            raise UsageError(f"`threshold` {self.threshold} must be >= 0")
        if self.report is not None:
            check_output_file(Path(self.report), "verify report")


#: What a gate must share with the run it gates: (name, where in provenance["model"]).
STACK_FIELDS = (("model", "sha256"), ("dtype", "dtype"), ("device kind", "device"),
                ("attention", "attn_implementation"))


def _kind(device: Any) -> Any:
    return str(device).split(":")[0] if device is not None else None


def gate_mismatches(gate_model: dict[str, Any], run_model: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{field: (gate's value, this run's value)}`` where the gate was fitted on another stack.
    Fields the gate does not record are not compared."""
    out = {}
    for name, key in STACK_FIELDS:
        g, r = gate_model.get(key), run_model.get(key)
        if name == "device kind":
            g, r = _kind(g), _kind(r)
        if g is not None and r is not None and g != r:
            out[name] = (g, r)
    return out


def exactness_statement(policy, out, summary: dict[str, Any]) -> str:
    """What this run checked, in one sentence: never more than the evidence."""
    ref = "stock solo decoding (batch size 1)" if policy.contract == "solo" else \
        "the same prompts alone through the batch-invariant kernels"
    ident = f"{summary['identical']}/{summary['sequences']} sequences identical to {ref}"
    if policy.name == "none":
        return f"{ident}; policy none makes no exactness claim"
    if policy.name == "always":
        return f"{ident}; every step was recomputed at batch size 1 and its token and K/V column kept"
    probe = out.probe or {}
    planned = ', '.join(f'{k}: {v}' for k, v in out.plan.items()) or 'all batched'
    if not probe:
        evidence = "no probe (rows per product forced)"
    elif policy.contract == "batch-invariant":
        evidence = f"probe: {probe.get('fixed_rows')}-row products position- and companion-independent; " \
                   f"{_shared('prompts share a prefill pack', 'each prompt prefilled alone', probe.get('prefill'))}; " \
                   f"{_shared('rows share an attention call', 'one attention call per row', probe.get('attention'))}; " \
                   f"run as planned ({planned})"
    else:
        evidence = (f"probe: every op of the fast path row-invariant up to {probe.get('up_to')} rows "
                    f"({probe.get('min_elements_per_row_count')} elements per row count) or run as planned "
                    f"({planned})")
    if policy.name == "invariant":
        return f"{ident}; {evidence}; no runtime check"
    if policy.fast_path == "padded":
        return f"{ident}; the paper's padded gate: steps below tau re-run on the batched cache, not exact by design"
    drift = len(out.drift_events)
    return (f"{ident}; {evidence}; runtime: {summary['triggers']} margin checks and {summary['audits']} audits "
            f"(every row at least every {out.audit_every} steps and at its last step) compared logits and "
            f"K/V bit for bit: {drift} drift event{'s' if drift != 1 else ''}"
            + (f", each repaired by replay at batch size 1; ops lowered: "
               f"{', '.join(x['op'] + ' -> ' + x['to'] for x in out.lowered) or 'none'}" if drift else ""))


def _shared(yes: str, no: str, check: dict[str, Any] | None) -> str:
    """One clause on a batch-invariant sharing check of the probe (see invariance.ProbeReport)."""
    if not check:
        return no
    if check.get("ok"):
        if "rows_compared" in check:
            return f"{yes} (checked: {check['rows_compared']} rows of shared calls equal to each row alone, bit for bit)"
        return f"{yes} (checked: {check['compared']} packed prompts equal to each prompt alone, logits and K/V bit for bit)"
    return f"{no} (a shared run differed: {check.get('first_failure')})"


def compare(pid: str, solo, gated, tokenizer) -> dict[str, Any]:
    """A per-sequence record: identical or not, where the first difference is, and both token lists
    (``solo_tokens``, ``policy_tokens``) so a failure can be debugged from the report alone."""
    from .formats.traces import first_divergence

    s, g = solo.tokens, gated.tokens
    first = first_divergence(s, g)
    rec: dict[str, Any] = {
        "prompt_id": pid,
        "identical": first is None,
        "steps": len(g),
        "solo_steps": len(s),
        "triggers": gated.triggers,
        "audits": gated.audits,
        "drift_events": len(gated.drift),
        "repairs": gated.repairs,
        "first_divergence": first,
        "solo_tokens": list(s),
        "policy_tokens": list(g),
    }
    if first is not None:
        def tok(seq, i):
            return seq[i] if i < len(seq) else None

        def text(t):
            return None if t is None else tokenizer.decode([t])

        rec.update({
            "solo_token": tok(s, first),
            "policy_token": tok(g, first),
            "solo_text": text(tok(s, first)),
            "policy_text": text(tok(g, first)),
            "solo_margin": solo.margins[first] if first < len(s) else None,
            "policy_margin": gated.margins[first] if first < len(g) else None,
            "verified_at_divergence": gated.verified[first] if first < len(g) else None,
            "solo_context": tokenizer.decode(s[max(0, first - 8):first + 1]),
            "policy_context": tokenizer.decode(g[max(0, first - 8):first + 1]),
        })
    return rec


def verify(config: VerifyConfig, progress=None, log: Callable[[str], None] | None = None,
           loaded=None) -> dict[str, Any]:
    """Run solo and policy decoding; return the :class:`~mgaudit.formats.report.VerifyReport`."""
    from .decoding.architectures import check_supported
    from .formats.gate import float32_decimal, float32_value, load_gate
    from .models import model_context
    from .prompts import encode_prompt, fit_context, load_prompts
    from .resources import check_fits

    log = log or (lambda m: None)
    report_progress = as_callback(progress)
    config.validate()
    # tau is a float32 number (margins are float32): --threshold 0.3 means float32(0.3)
    threshold, gate_info = (None if config.threshold is None else float32_value(config.threshold)), None
    if config.gate is not None:
        gate = load_gate(config.gate)
        threshold = gate["threshold"]
        gate_info = {"path": str(config.gate), "threshold": float32_decimal(threshold), "method": gate.get("method"),
                     "model": (gate.get("provenance") or {}).get("model", {}).get("name")}
    policy = DecodePolicy(config.policy, threshold, config.fast_path, config.max_rows, config.contract,
                          config.audit_every or AUDIT_EVERY)
    policy.validate()
    prompt_set = load_prompts(config.prompts, limit=config.limit)
    lm = loaded or config.load(log=log)
    check_supported(lm.model, policy.name)  # refuse an architecture before any decoding (exit 2)
    if gate_info:
        gate_model = (gate.get("provenance") or {}).get("model") or {}
        mismatches = gate_mismatches(gate_model, lm.provenance()["model"])
        gate_info["mismatches"] = {k: list(v) for k, v in mismatches.items()}
        if mismatches:
            what = "; ".join(f"{k} {g} (gate) vs {r} (this run)" for k, (g, r) in mismatches.items())
            if config.strict:
                raise GateMismatchError(f"{config.gate} was calibrated on another stack: {what}",
                                        mismatches=mismatches, hint="recalibrate on traces of this stack")
            log(f"warning: {config.gate} was calibrated on another stack: {what}; its tau may not hold here")
    all_ids = [encode_prompt(lm.tokenizer, p, chat=config.chat) for p in prompt_set.prompts]
    kept = fit_context([p.id for p in prompt_set.prompts], [len(x) for x in all_ids], config.max_new_tokens,
                       model_context(lm.model), skip=config.skip_long)
    skipped = [prompt_set.prompts[i].id for i in range(len(all_ids)) if i not in kept]
    if skipped:
        log(f"skipped {len(skipped)} of {len(all_ids)} prompts that do not fit the model's context of "
            f"{model_context(lm.model)} tokens with {config.max_new_tokens} new tokens")
    prompts = [prompt_set.prompts[i] for i in kept]
    ids = [all_ids[i] for i in kept]
    check_fits(lm, min(config.batch_size, len(ids)), max(len(x) for x in ids), config.max_new_tokens)
    eos, pad = lm.eos_token_ids, lm.pad_token_id

    stage = Stage(report_progress, "solo", "solo reference", len(ids), unit="prompts")
    t0 = time.perf_counter()
    solos = []
    for p in ids:
        # the reference of the contract: stock solo decoding, or the batch-invariant kernels at batch size 1
        solos.append(reference_decode(lm.model, p, config.max_new_tokens, eos, contract=policy.contract))
        stage.advance()
    solo_s = time.perf_counter() - t0

    stage = Stage(report_progress, "policy", f"policy {policy.name} (B={config.batch_size})", len(ids),
                  unit="prompts")
    out = decode(lm.model, ids, policy, config.batch_size, config.max_new_tokens, eos, pad,
                 on_batch=stage.advance)
    records = [compare(p.id, s, g, lm.tokenizer) for p, s, g in zip(prompts, solos, out.sequences)]
    steps = sum(r["steps"] for r in records)
    solo_tokens = sum(len(s.tokens) for s in solos)
    gated_tokens = sum(len(g.tokens) for g in out.sequences)
    summary = {
        "sequences": len(records),
        "identical": sum(r["identical"] for r in records),
        "all_identical": all(r["identical"] for r in records),
        "steps": steps,
        "triggers": sum(r["triggers"] for r in records),
        "trigger_rate": (sum(r["triggers"] for r in records) / steps) if steps else 0.0,
        "repairs": sum(r["repairs"] for r in records),
        "solo_seconds": solo_s,
        "policy_seconds": out.seconds,
        "speedup_vs_solo": solo_s / out.seconds if out.seconds else None,
        "solo_tokens_per_second": solo_tokens / solo_s if solo_s else None,
        "policy_tokens_per_second": gated_tokens / out.seconds if out.seconds else None,
        "max_rows": out.max_rows,
        "contract": out.contract,
        "audits": sum(g.audits for g in out.sequences),
        "audit_every": out.audit_every,
        "drift_events": len(out.drift_events),
        "plan": out.plan,
        "lowered": out.lowered,
    }
    summary["exactness"] = exactness_statement(policy, out, summary)
    report = VerifyReport(
        policy={
            "name": policy.name,
            # strict JSON has no infinity: an infinite tau (verify every step) is written as null
            "threshold": float32_decimal(threshold) if threshold is not None and math.isfinite(threshold) else None,
            "fast_path": policy.fast_path if policy.name == "gate" else None,
            "batch_size": config.batch_size,
            "gate": gate_info,
        },
        summary=summary,
        sequences=records,
        drift=[asdict(e) | {"prompt_id": prompts[e.row].id} for e in out.drift_events],
        probe=out.probe,
        provenance=run_provenance(lm.provenance(), prompt_set, config, prompts_extra={"skipped_too_long": skipped}),
    )
    if config.report is not None:
        report.write(Path(config.report))
    return report
