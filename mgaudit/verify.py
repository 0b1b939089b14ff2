"""``verify``: decode prompts alone and under a condition; are the outputs identical?

The **reference** is each prompt decoded alone: by the local model with the stock kernels
(``generate`` at batch size 1; or the batch-invariant kernels under that contract), by the
server audited, or by the backend ``reference`` names. The **candidate** decodes the same
prompts in batches: the local model under a decode policy, or a server with ``batch_size``
requests in flight. Per sequence the result says whether the token sequences are identical
and, where not, where they part, with both margins. Teacher-forced, every step where the
candidate's token differs from the reference's is a flip with both margins. Given a
threshold, every difference is classified as within noise or anomalous
(:mod:`mgaudit.audit.severity`); :func:`exit_code` turns the report into the CLI's verdict.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from .audit.options import FAIL_ON, AuditOptions
from .errors import EXIT_ANOMALOUS, GateMismatchError, UsageError
from .progress import Stage, as_callback
from .formats.report import VerifyReport


@dataclass
class VerifyConfig(AuditOptions):
    prompts: str
    policy: str | None = None  # the local model: none, always, gate, invariant (None: gate); a server: None
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
    fail_on: str = "any"  # any: every difference fails (exit 1 or 4); anomalous: only anomalous ones (exit 4)
    teacher_forced: bool = True  # also score diverged sequences on the reference's tokens
    seed: int = 0  # a server: which prompts share a group
    card: Path | None = None  # a server: check a sweep's card (its expectation sets `batch_size`)

    def validate(self) -> None:
        from .formats.files import check_output_file

        self.validate_audit()
        if self.batch_size < 1:
            raise UsageError(f"`batch_size` {self.batch_size} must be at least 1")
        if self.max_new_tokens < 1:
            raise UsageError(f"`max_new_tokens` {self.max_new_tokens} must be at least 1")
        if self.fail_on not in FAIL_ON:
            raise UsageError(f"`fail_on` {self.fail_on!r} is not one of {', '.join(FAIL_ON)}")
        if self.fail_on == "anomalous" and self.gate is None and self.threshold is None:
            raise UsageError("`fail_on` anomalous needs a threshold to tell noise from anomalies",
                             hint="give `gate` gate.json or `threshold` TAU")
        if self.card is not None and self.endpoint is None:
            raise UsageError("`card` holds a server's expectation", hint="give `endpoint` too")
        if self.endpoint is not None:
            if self.policy is not None:
                raise UsageError("`policy` decodes with the local model; a server is audited as it batches",
                                 hint="drop `policy`, or drop `endpoint`")
            if self.contract != "solo":
                raise UsageError("`contract` applies to the local model's policies", hint="drop `contract`")
        else:  # the policy's own checks (tau standing in for the gate file's, which is read later) ...
            from .audit.severity import Threshold

            self.decode_policy(Threshold(0.0))
            # ... and the gate policy's threshold
            if (self.policy or "gate") == "gate" and self.gate is None and self.threshold is None:
                raise UsageError("`policy` gate needs `gate` gate.json or `threshold` TAU",
                                 hint="or choose `policy` none, always or invariant")
        if self.report is not None:
            check_output_file(Path(self.report), "verify report")

    def decode_policy(self, threshold):
        """The local candidate's policy (tau from the threshold, where one is given)."""
        from .decoding.policies import AUDIT_EVERY, DecodePolicy

        policy = DecodePolicy(self.policy or "gate", None if threshold is None else threshold.tau, self.fast_path,
                              self.max_rows, self.contract, AUDIT_EVERY if self.audit_every is None else self.audit_every)
        policy.validate()
        return policy


def exit_code(report: VerifyReport | dict, fail_on: str = "any") -> int:
    """0 every sequence identical (or, under ``fail_on="anomalous"``, every difference within noise);
    1 some differ, none anomalous; 4 some difference is anomalous."""
    s = report["summary"]
    if s["all_identical"]:
        return 0
    if (s["severity"]["counts"].get("anomalous") or 0) + (s["severity"]["first_divergences"].get("anomalous") or 0):
        return EXIT_ANOMALOUS
    return 0 if fail_on == "anomalous" else 1


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


def check_gate_stack(threshold, run_model: dict[str, Any], strict: bool, log) -> dict[str, Any] | None:
    """Warn (or, ``strict``, refuse) where the gate was calibrated on another stack."""
    if threshold is None or threshold.gate is None:
        return None
    path = threshold.source["path"]
    gate_model = (threshold.gate.get("provenance") or {}).get("model") or {}
    mismatches = gate_mismatches(gate_model, run_model)
    if mismatches:
        what = "; ".join(f"{k} {g} (gate) vs {r} (this run)" for k, (g, r) in mismatches.items())
        if strict:
            raise GateMismatchError(f"{path} was calibrated on another stack: {what}", mismatches=mismatches,
                                    hint="recalibrate on traces of this stack")
        log(f"warning: {path} was calibrated on another stack: {what}; its tau may not hold here")
    return {k: list(v) for k, v in mismatches.items()}


def verify(config: VerifyConfig, progress=None, log: Callable[[str], None] | None = None,
           loaded=None) -> VerifyReport:
    """Decode the reference and the candidate, compare them; return the :class:`VerifyReport`."""
    from .audit.backend import build_requests
    from .audit.pair import open_pair
    from .audit.steps import Settings
    from .prompts import load_prompts

    log = log or (lambda m: None)
    config.validate()
    card = None
    if config.card is not None:
        from .formats.card import Card, expected_level

        card = Card.read(Path(config.card))
        config.batch_size = expected_level(card, Path(config.card))
    threshold = config.threshold_of()
    policy = config.decode_policy(threshold) if config.endpoint is None else None
    prompt_set = load_prompts(config.prompts, limit=config.limit)
    settings = Settings(config.max_new_tokens, config.chat, config.contract, config.sampling())
    with open_pair(config, loaded=loaded, log=log) as pair:
        cand = pair.candidate
        if cand.kind == "local":
            from .decoding.architectures import check_supported

            check_supported(cand.lm.model, policy.name)  # refuse an architecture before any decoding (exit 2)
        # a gate gates the local model's policy: it must come from that stack (for a server, tau only
        # classifies differences, and the report says where it came from)
        mismatches = check_gate_stack(threshold, cand.stack()["model"], config.strict, log) \
            if cand.kind == "local" else None
        card_check = check_card(card, config, cand, log) if card is not None else None
        vocabulary = pair.check_vocabularies()
        context = (pair.reference if pair.reference.kind == "local" else cand).context()
        requests, skipped = build_requests(prompt_set, pair.tokenizer(), settings, context, config.skip_long, log)
        job = _VerifyJob(config, pair, requests, settings, threshold, policy, as_callback(progress), log)
        job.card = card_check
        report = job.run(prompt_set, skipped, vocabulary, mismatches)
    if config.report is not None:
        report.write(Path(config.report))
    return report


def check_card(card, config: VerifyConfig, candidate, log) -> dict[str, Any]:
    """Warn (or, ``strict``, refuse) where the server is not the one the card was measured on; what the
    report says about the card."""
    from .formats.card import engine_differences

    differ = engine_differences(card, candidate.info.summary())
    if differ:
        what = "; ".join(f"{k} {a} (card) vs {b} (this server)" for k, (a, b) in differ.items())
        if config.strict:
            raise UsageError(f"{config.card} was measured on another server: {what}",
                             hint="sweep this server again for its own card")
        log(f"warning: {config.card} was measured on another server: {what}; its expectation may not hold here")
    return {"path": str(config.card), "expects": card.expectation["statement"], "batch_size": config.batch_size,
            "engine_differences": differ, "measured": (card.provenance or {}).get("created")}


class _VerifyJob:
    def __init__(self, config: VerifyConfig, pair, requests, settings, threshold, policy, report, log):
        from .audit.compare import token_text

        self.config, self.pair, self.requests, self.settings = config, pair, requests, settings
        self.threshold, self.policy, self.report, self.log = threshold, policy, report, log
        self.text = token_text(pair.tokenizer())
        self.card: dict[str, Any] | None = None  # what the report says about a card checked (check_card)

    def condition(self):
        from .audit.conditions import Condition

        if self.pair.candidate.kind == "local":
            return Condition("policy", self.config.batch_size, policy=self.policy)
        return Condition("in-flight", self.config.batch_size) if self.config.batch_size > 1 else Condition("alone")

    def groups(self, cond) -> list[tuple[list[int], int]]:
        """The candidate's groups of request positions: (members, owned)."""
        from .audit.conditions import batch_groups

        n, b = len(self.requests), self.config.batch_size
        if cond.kind == "policy":  # decode() runs consecutive batches of the batch size
            return [(list(range(s, min(n, s + b))), min(n, s + b) - s) for s in range(0, n, b)]
        if cond.kind == "alone":
            return [([i], 1) for i in range(n)]
        return batch_groups(n, b, self.config.seed)

    def run(self, prompt_set, skipped, vocabulary, mismatches) -> VerifyReport:
        from .audit.refcache import ReferenceRuns
        from .models import cache_root

        c, pair, reqs = self.config, self.pair, self.requests
        if pair.candidate.kind == "local":
            from .resources import check_fits

            check_fits(pair.candidate.lm, min(c.batch_size, len(reqs)), max(r.prompt_len for r in reqs),
                       c.max_new_tokens)
        slots = getattr(getattr(pair.candidate, "info", None), "slots", None)
        if slots is not None and c.batch_size > slots:
            self.log(f"note: the server has {slots} slots; groups of {c.batch_size} queue beyond that")
        refs = ReferenceRuns(pair.reference, self.settings, cache_root() if c.reference_cache else None)
        stage = Stage(self.report, "solo", "reference runs", len(reqs), unit="prompts")
        t0 = time.perf_counter()
        ref_runs = refs.get(reqs, on_done=lambda k: stage.advance(k))
        ref_s = time.perf_counter() - t0
        cond = self.condition()
        groups = self.groups(cond)
        t1 = time.perf_counter()
        cand_runs = self._candidate(cond, groups)
        cand_s = time.perf_counter() - t1
        records = [self._record(r, ref, run) for r, ref, run in zip(reqs, ref_runs, cand_runs)]
        forced = self._teacher_forced(cond, groups, ref_runs, cand_runs, records) if c.teacher_forced else None
        differences = [dict(r["divergence"], prompt_id=r["prompt_id"], step=r["first_divergence"],
                            kind="first_divergence") for r in records if not r["identical"]]
        for r in records:
            differences.extend(r.get("flips") or [])
        summary = self._summary(records, differences, forced, ref_runs, cand_runs, ref_s, cand_s, refs, cond)
        if not self.settings.sampling.greedy:
            summary["sampling"] = self.settings.sampling.key()
            if pair.candidate.kind == "endpoint":
                summary["seeds"] = self._seed_audit(ref_runs)
        return self._report(summary, records, differences, prompt_set, skipped, vocabulary, mismatches, cond, refs)

    def _seed_audit(self, ref_runs) -> dict[str, Any]:
        """Does the server honour seeds (:mod:`mgaudit.audit.seeds`)?"""
        from .audit.seeds import seed_audit

        stage = Stage(self.report, "seeds", "seed audit (each prompt alone, same and other seed)",
                      len(self.requests), unit="prompts")
        return seed_audit(self.pair.candidate, self.requests, self.settings,
                          None if self.pair.cross else ref_runs, on_done=lambda k: stage.advance(k))

    def _candidate(self, cond, groups) -> list:
        cand, reqs = self.pair.candidate, self.requests
        stage = Stage(self.report, "policy", f"candidate: {cond.describe()}", len(reqs), unit="prompts")
        if cond.kind == "policy":
            return cand.together(reqs, cond, self.settings, on_done=lambda k: stage.advance(k))
        runs: list = [None] * len(reqs)
        for members, owned in groups:
            got = cand.together([reqs[i] for i in members], cond, self.settings)
            for row in range(owned):
                runs[members[row]] = got[row]
            stage.advance(owned)
        return runs

    def _record(self, req, ref, run) -> dict[str, Any]:
        from .audit.compare import sequence_record

        rec = sequence_record(req, ref, run, self.threshold, self.text)
        if not self.settings.sampling.greedy:
            rec["draw_seed"] = self.settings.draw_seed(req)
        return rec

    def _teacher_forced(self, cond, groups, ref_runs, cand_runs, records) -> dict[str, Any]:
        """Score every diverged sequence on the reference's tokens (its group again, teacher-forced)."""
        from .audit.compare import forced_flips

        diverged = {i for i, r in enumerate(records) if not r["identical"]}
        todo = [(m, o) for m, o in groups if diverged & set(m[:o])]
        steps = flips = scored = 0
        stage = Stage(self.report, "forced", "teacher-forced scoring", len(todo), unit="groups")
        for members, owned in todo:
            rows = members[:owned]  # the group's recorded rows (a short group's fill-up rows are not scored)
            forced = self.pair.candidate.forced([self.requests[i] for i in rows], cond, self.settings,
                                                [ref_runs[i] for i in rows], [cand_runs[i] for i in rows])
            stage.advance()
            for row, i in enumerate(rows):
                if i not in diverged:
                    continue
                fl = forced_flips(self.requests[i], ref_runs[i], forced[row], self.threshold, self.text)
                records[i]["flips"] = fl
                records[i]["forced_steps"] = len(forced[row])
                scored += int(len(forced[row]) == len(ref_runs[i]))
                steps += len(forced[row])
                flips += len(fl)
        steps += sum(len(ref_runs[i]) for i in range(len(records)) if i not in diverged)
        scoring = self.pair.candidate.scoring()
        # complete: every diverged sequence was scored to the reference's end
        return {**scoring, "available": scored == len(diverged), "sequences_scored": scored, "steps": steps,
                "flips": flips, "flip_rate": flips / steps if steps else 0.0}

    def _summary(self, records, differences, forced, ref_runs, cand_runs, ref_s, cand_s, refs, cond) -> dict:
        from .audit.compare import prompt_tokens_differ
        from .audit.severity import summarize

        steps = sum(r["steps"] for r in records)
        s: dict[str, Any] = {
            "sequences": len(records),
            "identical": sum(r["identical"] for r in records),
            "all_identical": all(r["identical"] for r in records),
            "steps": steps,
            "teacher_forced": forced,
            # teacher-forced flips are one event each; without teacher forcing, each first divergence is
            "severity": summarize([d for d in differences if d["kind"] == ("flip" if forced else "first_divergence")],
                                  self.threshold),
            "reference_seconds": ref_s if refs.decoded else None,
            "candidate_seconds": cand_s,
            "reference_tokens_per_second": (sum(len(r) for r in ref_runs) / ref_s) if ref_s and refs.decoded else None,
            "candidate_tokens_per_second": sum(len(r) for r in cand_runs) / cand_s if cand_s else None,
            "prompt_tokens_differ": prompt_tokens_differ(records),
        }
        # a free-running divergence is a difference too, even where teacher forcing found no flip there
        s["severity"]["first_divergences"] = summarize([d for d in differences if d["kind"] == "first_divergence"],
                                                       self.threshold)["counts"]
        if not self.pair.cross and refs.decoded:
            s["speedup_vs_reference"] = ref_s / cand_s if cand_s else None
        if self.pair.candidate.kind == "endpoint":
            s["endpoint"] = self.pair.candidate.io()
            s["shorter_than_reference"] = sum(r["steps"] < r["reference_steps"] for r in records)
        if cond.kind == "policy":
            s.update(self._policy_summary(records, steps))
        return s

    def _policy_summary(self, records, steps) -> dict[str, Any]:
        out = self.pair.candidate.last_output
        triggers = sum(r.get("triggers", 0) for r in records)
        s = {"triggers": triggers, "trigger_rate": triggers / steps if steps else 0.0,
             "repairs": sum(r.get("repairs", 0) for r in records), "audits": sum(r.get("audits", 0) for r in records),
             "audit_every": out.audit_every, "drift_events": len(out.drift_events), "plan": out.plan,
             "lowered": out.lowered, "max_rows": out.max_rows, "contract": out.contract}
        s["exactness"] = exactness_statement(self.policy, out, {**s, "identical": sum(r["identical"] for r in records),
                                                                "sequences": len(records)})
        return s

    def _report(self, summary, records, differences, prompt_set, skipped, vocabulary, mismatches, cond,
                refs) -> VerifyReport:
        from .formats.gate import float32_decimal
        from .formats.provenance import run_provenance

        pair, tau = self.pair, self.threshold
        candidate: dict[str, Any] = {"backend": pair.candidate.kind, "label": pair.candidate.label,
                                     "condition": cond.key(), "describe": cond.describe(),
                                     "batch_size": self.config.batch_size,
                                     "threshold": None if tau is None or not math.isfinite(tau.tau)
                                     else float32_decimal(tau.tau)}
        if self.policy is not None:
            candidate["policy"] = {"name": self.policy.name, "fast_path": self.policy.fast_path
                                   if self.policy.name == "gate" else None, "contract": self.policy.contract,
                                   "audit_every": self.policy.audit_every if self.policy.audits else None}
        else:
            candidate["endpoint"] = pair.candidate.url
            candidate["engine"] = pair.candidate.info.engine
        if mismatches is not None:
            candidate["gate_mismatches"] = mismatches
        if self.card is not None:
            candidate["card"] = self.card
        reference = {"backend": pair.reference.kind, "label": pair.reference.label, "condition": "alone",
                     "contract": self.settings.contract, "cross": pair.cross, **refs.describe()}
        out = pair.candidate.last_output if pair.candidate.kind == "local" else None
        stack = dict(pair.candidate.stack())
        if pair.cross:
            stack["reference"] = pair.reference.stack()
        return VerifyReport(
            candidate=candidate, reference=reference, summary=summary, sequences=records, differences=differences,
            drift=[asdict(e) | {"prompt_id": self.requests[e.row].id} for e in out.drift_events] if out else [],
            probe=out.probe if out else None,
            provenance=run_provenance(stack, prompt_set, self.config, count=len(records),
                                      prompts_extra={"skipped_too_long": skipped}, vocabulary=vocabulary,
                                      threshold=None if tau is None else tau.source),
        )

def exactness_statement(policy, out, summary: dict[str, Any]) -> str:
    """What a local policy run checked, in one sentence: never more than the evidence."""
    ref = "stock solo decoding (batch size 1)" if policy.contract == "solo" else \
        "the same prompts alone through the batch-invariant kernels"
    if out.sampling is not None:
        ref += ", each prompt sampled by mgaudit's sampler with its own draw seed"
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
    """One clause on a batch-invariant sharing check of the probe."""
    if not check:
        return no
    if check.get("ok"):
        if "rows_compared" in check:
            return f"{yes} (checked: {check['rows_compared']} rows of shared calls equal to each row alone, bit for bit)"
        return f"{yes} (checked: {check['compared']} packed prompts equal to each prompt alone, logits and K/V bit for bit)"
    return f"{no} (a shared run differed: {check.get('first_failure')})"
