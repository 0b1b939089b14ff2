"""Batched decoding under a policy (:mod:`mgaudit.decoding.policy`), with margin-gated
verification and drift audits, on the one loop (:func:`mgaudit.decoding.loop.greedy`): greedy, or
seeded sampling (``sampling``, :mod:`mgaudit.decoding.sampling`: each prompt draws from its own
stream, so a check or a replay at batch size 1 re-derives exactly the token the prompt alone takes).

``none``
    What ``generate`` does with a batch: left-padded batched prefill and decode
    with a padding mask. Fast, not batch-invariant.
``always``
    LLM-42-style: solo prefill, padded batched decode, and every step of every
    row recomputed at batch size 1 on the row's own cache; the verifier's token
    and K/V column are kept. Exact by induction, costs more than solo.
``gate``
    Solo prefill, then *ragged* batched decode: projections, norms and MLP
    batched, each op run as the invariance probe's plan says (batched, in
    another layout, or in chunks of rows), attention per row over its own
    unpadded K/V. A row is checked at batch size 1 when its batched margin is
    below ``threshold``, at least every ``audit_every`` steps, and on the step
    that ends it. A check compares the logits and the K/V column bit for bit
    with the fast path's. A difference is a *drift event*: the row's cache is
    restored to its last checked state and the steps since are replayed at batch
    size 1, then the op that differed is run in smaller chunks for the rest of
    the run. ``fast_path="padded"`` gives the paper's design instead (padded
    batched prefill and decode, verified below tau, token and column repaired):
    kept to measure that it is not exact.
``invariant``
    The ``gate`` fast path with no verification: exact where the probe holds.

Contracts: ``solo`` (the default): identical to what the model gives alone with
the stock kernels (``generate`` at batch size 1). ``batch-invariant``: kernels
whose result for a prompt does not depend on the batch (the packed prefill of
:mod:`mgaudit.decoding.packed`, every linear layer of a decode step at a fixed row count,
attention over K/V padded to a multiple of a bucket: :func:`mgaudit.decoding.ragged.bucketed_sdpa`),
solo included; its reference is the batch-1 run through the same kernels (see
:func:`reference_decode`).

A policy is resolved once per batch into its parts (:class:`_Parts`: the prefill, the
fast path's advance, the kernels a check runs), so :func:`decode_batch` is the loop and
what it records.

**Teacher forcing** (``forced``): row ``b`` is fed the tokens ``forced[b]`` and decodes
``len(forced[b])`` steps (no EOS stop); each step records the token the policy chose there
(its argmax after any check) given the forced history, as ``padded_decode(forced=...)`` does
for stock decoding. The checks still run on that history: a check recomputes the step at
batch size 1 from the row's cache of forced tokens. A *repair* under forcing means the
policy's choice at that step (and the K/V column it keeps) came from the batch-1 check,
not from the fast path; a drift replay re-runs the forced tokens since the last checked
step, records the replayed choices, and never ends a row early.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from . import step as _step
from .cache_ops import (batch_cache, cache_layers, columns_equal, pad_cache_left, pad_columns_left, row_cache,
                        write_columns)
from .kernels import Plan, decode_kernels, fixed_rows_of, fixed_rows_plan, localize, plan_for
from .loop import Padded, greedy, padded_prefill
from .packed import packed_prefill, supported as packed_supported
from .policy import AUDIT_EVERY, CONTRACTS, EXACT, FAST_PATHS, POLICIES, DecodePolicy  # noqa: F401  (re-exported)
from .ragged import bucketed_attention, ragged_step
from .results import DecodeOutput, DriftEvent, SequenceResult  # noqa: F401  (re-exported)
from .sampling import GREEDY, Sampling, sample_rule
from .step import left_pad, new_cache
from ..errors import UsageError


# --------------------------------------------------------------------------- a policy resolved


@dataclass
class _Parts:
    """What a policy runs for one batch, resolved once."""

    prefill: str  # "padded" (generate's), "solo" (each prompt alone), "packed" (batch-invariant)
    ragged: bool  # the fast path: ragged step (else generate's padded batch)
    plan: Plan  # how each op of the fast path runs (lowered in place after drift)
    verifier_plan: Plan  # the kernels a batch-1 check runs (the contract's)
    bucket: int | None  # batch-invariant attention: each row's K/V padded to a multiple of this
    checks: str | None  # None, "keep" (always, padded gate: keep the check's token and column), "audit"
    audit_every: int | None


def _resolve(model, policy: DecodePolicy, plan: Plan | None, rows: int) -> _Parts:
    fixed = fixed_rows_plan(model) if policy.contract == "batch-invariant" else None
    if plan is None:
        if fixed is not None and policy.ragged:
            plan = fixed
        elif policy.ragged and policy.max_rows:
            plan = plan_for(None, rows, max_rows=policy.max_rows, model=model)
        else:
            plan = Plan()
    if not policy.solo_prefill:
        prefill = "padded"
    elif fixed is not None and policy.ragged and packed_supported(model):
        prefill = "packed"
    else:
        prefill = "solo"
    return _Parts(prefill, policy.ragged, plan, fixed if fixed is not None else Plan(),
                  bucketed_attention(model) if fixed is not None and policy.ragged else None,
                  ("audit" if policy.audits else "keep") if policy.checks else None,
                  policy.audit_every if policy.audits else None)


class _Batch:
    """The state of one batch being decoded; :func:`decode_batch`'s loop is the only thing that advances it."""

    def __init__(self, model, prompts, parts: _Parts, budgets, eos_ids, pad_id, keep_logits, row_offset, forced,
                 rule=None):
        self.model, self.parts, self.rule = model, parts, rule
        self.device = model.device
        self.bsz = len(prompts)
        self.eos = set(int(e) for e in eos_ids)
        self.pad_id = pad_id
        self.budgets = budgets
        self.forced = forced
        self.results = [SequenceResult(logits=[] if keep_logits else None, kind=[] if rule is not None else None)
                         for _ in range(self.bsz)]
        self.lengths = [len(p) for p in prompts]
        # the batch-invariant attention pads rows to a multiple of `bucket` columns from these zero columns
        self.zero_columns = parts.bucket - 1 if parts.bucket else 0
        self.width = max(self.lengths) + self.zero_columns
        self.starts = [self.width - n for n in self.lengths]
        self.done = [False] * self.bsz
        self.certified = [0] * self.bsz  # last step whose logits (and all earlier columns) were checked
        self.row_offset = row_offset

    def prefill(self, prompts):
        """(logits, cache, positions, advance): the prefill the policy asks for, and its fast path."""
        model, parts = self.model, self.parts
        if parts.prefill == "padded":
            # generate-style batched prefill; sliding layers keep the columns a verifier copies
            return padded_prefill(model, prompts, self.pad_id, cache=batch_cache(model))
        if parts.prefill == "packed":
            # the batch-invariant prefill: prompts packed, fixed-size GEMM chunks, attention per prompt
            logits, kv = packed_prefill(model, prompts, fixed_rows_of(parts.verifier_plan),
                                        shared=parts.plan.prefill_shared)
            cache = pad_columns_left([[(k, v, 0) for k, v in row] for row in kv], self.lengths, self.zero_columns)
        else:
            caches, rows = [], []
            for p in prompts:
                c = new_cache(model)
                ids = torch.tensor([list(p)], dtype=torch.long, device=self.device)
                # exactly what solo decoding (and generate at batch size 1) runs
                rows.append(_step.forward_last(model, ids, None, torch.arange(len(p), device=self.device)[None], c))
                caches.append(c)
            logits = torch.cat(rows)
            cache = pad_cache_left(model, caches, self.lengths, zero_columns=self.zero_columns)
        positions = torch.tensor(self.lengths, dtype=torch.long, device=self.device)[:, None] - 1
        advance = self.ragged_forward if parts.ragged else Padded(model, left_pad(prompts, self.pad_id,
                                                                                  self.device)[1])
        return logits, cache, positions, advance

    def ragged_forward(self, cache, fed, positions, kernels: bool = True):
        """One ragged fast-path step (``kernels``: with the plan applied; off to replay it for localize)."""
        plan = self.parts.plan
        with contextlib.ExitStack() as stack:
            stack.enter_context(ragged_step(self.model, self.starts, cache=None if kernels else cache,
                                            bucket=self.parts.bucket, share_span=plan.attention_span))
            if kernels:
                stack.enter_context(decode_kernels(self.model, plan))
            return _step.forward_last(self.model, fed, None, positions, cache)

    def solo_step(self, one, fed: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One forward of one row at batch size 1 (``fed``, ``positions``: ``[1, 1]``) through the
        contract's kernels: what its reference runs."""
        with contextlib.ExitStack() as stack:
            if self.parts.bucket:
                stack.enter_context(ragged_step(self.model, [self.zero_columns], bucket=self.parts.bucket))
            stack.enter_context(decode_kernels(self.model, self.parts.verifier_plan))
            return _step.forward_last(self.model, fed, None, positions, one)

    def row_cache(self, cache, b: int, end: int):
        """Row ``b``'s columns up to ``end`` as a batch-1 cache (with the zero columns, if any)."""
        return row_cache(self.model, cache, b, self.starts[b] - self.zero_columns, end)

    def choose(self, b: int, logits: torch.Tensor, step: int) -> int:
        """The token row ``b`` takes at ``step`` from batch-1 ``logits`` ``[1, vocab]``: the argmax, or
        the row's own draw for that step."""
        if self.rule is None:
            return int(torch.argmax(logits, dim=-1)[0])
        return self.rule.row(b, step).pick(logits, 0).token[0]

    def fed_at(self, b: int, step: int) -> int:
        """The token row ``b`` was fed after ``step``: its choice there, or the forced token."""
        return self.forced[b][step] if self.forced is not None else self.results[b].tokens[step]


# --------------------------------------------------------------------------- the loop


@dataclass
class _Marks:
    """What the checks of one step did, per row."""

    verified: list[bool]
    repaired: list[bool]
    audited: list[bool]
    logits: list[torch.Tensor] | None  # per row, the logits its token came from (keep_logits)


@torch.inference_mode()
def decode_batch(
    model,
    prompts: Sequence[Sequence[int]],
    policy: DecodePolicy,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    pad_id: int,
    plan: Plan | None = None,
    keep_logits: bool = False,
    row_offset: int = 0,
    forced: Sequence[Sequence[int]] | None = None,
    rule=None,
) -> list[SequenceResult]:
    """Decode one batch of prompts under ``policy``: greedy, or sampled by ``rule`` (a
    :class:`mgaudit.decoding.sampling.SampleRule` over the batch's rows).

    ``plan`` (a :class:`mgaudit.decoding.kernels.Plan`) says how each op runs on the ragged path
    (default: the contract's kernels, or ``policy.max_rows`` rows per product, else batched);
    drift events lower ops in it in place. ``forced``: per row, the tokens to feed (teacher
    forcing; see the module doc); the row then decodes ``len(forced[b])`` steps.
    """
    parts = _resolve(model, policy, plan, len(prompts))
    budgets = [len(f) for f in forced] if forced is not None else [max_new_tokens] * len(prompts)
    st = _Batch(model, prompts, parts, budgets, eos_ids, pad_id, keep_logits, row_offset, forced, rule)
    logits, cache, positions, advance = st.prefill(prompts)
    for s in greedy(logits, cache, positions, advance, eos_ids=eos_ids, pad_id=pad_id, budgets=budgets,
                    stop_at_eos=forced is None, rule=rule):
        st.done = [not a for a in s.active]
        marks = _Marks([False] * st.bsz, [False] * st.bsz, [False] * st.bsz,
                       [s.logits[b] for b in range(st.bsz)] if keep_logits else None)
        if s.index > 0 and parts.checks:
            _check_step(st, s, cache, policy, marks)
        for b in range(st.bsz):
            if st.done[b] or s.chosen[b] is None:
                continue
            r = st.results[b]
            r.tokens.append(s.chosen[b])
            r.top1.append(s.top1[b])
            r.top2.append(s.top2[b])
            r.runner_up.append(s.runner_up[b])
            r.verified.append(marks.verified[b])
            r.repaired.append(marks.repaired[b])
            r.audited.append(marks.audited[b])
            if r.kind is not None:
                r.kind.append(s.kind[b])
            if keep_logits:
                r.logits.append(marks.logits[b].detach().float().cpu().clone())
            if forced is not None:
                s.chosen[b] = forced[b][s.index]
    return st.results


def _check_step(st: _Batch, s, cache, policy: DecodePolicy, marks: _Marks) -> None:
    """Check the rows due at this step at batch size 1; keep (always, padded gate) or compare
    (ragged gate) what the check computed; roll drifted rows back and replay them."""
    total = cache.get_seq_length()
    drifted = []
    for b in range(st.bsz):
        if st.done[b]:
            continue
        low = policy.verifies(s.margin(b))
        stops = (st.forced is None and s.chosen[b] in st.eos) or len(st.results[b].tokens) + 1 >= st.budgets[b]
        every = st.parts.audit_every
        due = every is not None and (s.index - st.certified[b] >= every or stops)
        if not (low or due):
            continue
        one = st.row_cache(cache, b, total - 1)
        solo_logits = st.solo_step(one, s.fed[b:b + 1], s.positions[b:b + 1])
        marks.verified[b] = True
        marks.audited[b] = not low
        if st.parts.checks == "keep":
            # always, or the paper's padded gate: keep the verifier's token and K/V column
            s_tok = st.choose(b, solo_logits, s.index)
            write_columns(cache, one, b)
            if s_tok != s.chosen[b]:
                marks.repaired[b] = True
                s.chosen[b] = s_tok
            if marks.logits is not None:
                marks.logits[b] = solo_logits[0]
            continue
        same_logits = torch.equal(solo_logits[0].float(), s.logits[b].float())
        same_kv = columns_equal(cache, one, b)
        if same_logits and same_kv:
            st.certified[b] = s.index
            continue
        what = "+".join(w for w, ok in (("logits", same_logits), ("kv", same_kv)) if not ok)
        drifted.append((b, what, one, solo_logits))
    if drifted:
        _on_drift(st, s, cache, drifted, marks)


def _on_drift(st: _Batch, s, cache, drifted, marks: _Marks) -> None:
    """Attribute the drift to an op and lower it in the plan (the batched step is replayed on the
    cache as it was), then make every drifted row exact again."""
    before = _truncated_copy(st.model, cache)
    attribution = localize(st.model, st.parts.plan,
                           lambda: st.ragged_forward(before, s.fed, s.positions, kernels=False))
    lowered_to = None
    if attribution is not None:
        key, rows_ran = attribution
        lowered_to = st.parts.plan.lower(key, max(1, rows_ran // 2) if rows_ran > 2 else 1,
                                         f"drift at step {s.index}").describe()
    for b, what, one, solo_logits in drifted:
        event = _repair_row(st, s, cache, b, what, one, solo_logits, marks)
        if attribution is not None:
            event.op, event.rows, event.lowered_to = attribution[0], attribution[1], lowered_to
        st.results[b].drift.append(event)
        marks.repaired[b] = event.token_changed


def _truncated_copy(model, cache, drop: int = 1):
    """A new batch cache holding all but the last ``drop`` columns of ``cache``."""
    out = new_cache(model)
    for i, layer in enumerate(cache_layers(cache)):
        out.update(layer.keys[:, :, :-drop].clone(), layer.values[:, :, :-drop].clone(), i)
    return out


def _repair_row(st: _Batch, s, cache, b: int, what: str, one, solo_logits, marks: _Marks) -> DriftEvent:
    """Make row ``b`` exact again after a drift event at step ``s.index``.

    If the previous step was the last checked one, the batch-1 recomputation just done
    is the solo computation: keep its column and token. Otherwise restore the row's
    cache to its last checked state and replay the steps since at batch size 1.
    """
    step, c = s.index, st.certified[b]
    old_tok = s.chosen[b]
    logits_b, replayed = solo_logits, 0
    if c == step - 1:
        write_columns(cache, one, b)
    else:
        one, logits_b, replayed = _replay(st, cache, b, c, step)
        if not st.done[b]:
            write_columns(cache, one, b, replayed)
    event = DriftEvent(st.row_offset + b, step, what, c, replayed)
    if st.done[b]:
        s.chosen[b] = None  # nothing more for this row
        event.token_changed = True
        return event
    s.chosen[b] = st.choose(b, logits_b, step)
    if marks.logits is not None:
        marks.logits[b] = logits_b[0]
    st.certified[b] = step
    event.token_changed = s.chosen[b] != old_tok
    return event


def _replay(st: _Batch, cache, b: int, c: int, step: int):
    """Row ``b``'s cache restored to its last checked step ``c``, then steps ``c+1..step`` replayed
    at batch size 1 on the one loop, from the token fed after step ``c``; each replayed step's
    choice (the argmax or the row's draw for that step, recorded; under forcing the forced token is
    fed) replaces the fast path's. Returns (the row cache, the logits of ``step`` or None if the row ended at
    an EOS first, steps replayed)."""
    r = st.results[b]
    # columns up to the one fed at step c: [starts[b], width + c)
    one = st.row_cache(cache, b, st.width + c)
    fed = torch.tensor([[st.fed_at(b, c)]], dtype=torch.long, device=st.device)
    last = torch.tensor([[st.lengths[b] + c - 1]], dtype=torch.long, device=st.device)
    logits_b, replayed = None, 0
    rule = st.rule.row(b, c + 1) if st.rule is not None else None
    for t in greedy(None, one, last, st.solo_step, eos_ids=st.eos, pad_id=st.pad_id, budgets=[step - c],
                    stop_at_eos=st.forced is None, fed=fed, rule=rule):
        j = c + 1 + t.index
        logits_b = t.logits
        replayed += 1
        if j == step:
            break
        r.tokens[j] = t.token[0]  # top-1/top-2 stay the fast path's (what the gate saw)
        r.verified[j], r.audited[j] = True, True
        if r.logits is not None:
            r.logits[j] = logits_b[0].detach().float().cpu().clone()
        if st.forced is not None:
            t.chosen[0] = st.forced[b][j]
        elif t.token[0] in st.eos:
            # the row ends earlier than the fast path said
            r._truncate(j + 1)
            st.done[b] = True
            break
    return one, logits_b, replayed


# --------------------------------------------------------------------------- public entry points


def reference_decode(model, prompt: Sequence[int], max_new_tokens: int, eos_ids: Sequence[int],
                     contract: str = "solo", keep_logits: bool = False, sampling: Sampling = GREEDY,
                     seed: int | None = None) -> SequenceResult:
    """The batch-1 reference a policy is checked against under ``contract``.

    ``solo``: stock kernels, what ``generate`` gives for the prompt alone (greedy) or mgaudit's
    sampler on those logits. ``batch-invariant``: the same prompt alone through the
    fixed-row-count kernels. ``sampling``/``seed``: the prompt's draw seed (see :func:`decode`).
    """
    from .stock import solo_decode

    rule = sample_rule(sampling, [seed if seed is not None else sampling.draw_seed("0")])
    if contract == "solo":
        tr = solo_decode(model, prompt, max_new_tokens, eos_ids, keep_logits=keep_logits, rule=rule)
        n = len(tr)
        return SequenceResult(tokens=list(tr.tokens), top1=list(tr.top1), top2=list(tr.top2),
                              runner_up=list(tr.runner_up), verified=[False] * n, repaired=[False] * n,
                              audited=[False] * n, logits=[t.float() for t in tr.logits] if keep_logits else None,
                              kind=tr.kind)
    pol = DecodePolicy("invariant", contract=contract)
    return decode_batch(model, [prompt], pol, max_new_tokens, eos_ids, pad_id=0, keep_logits=keep_logits,
                        rule=rule)[0]


def decode(
    model,
    prompts: Sequence[Sequence[int]],
    policy: DecodePolicy,
    batch_size: int,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    pad_id: int,
    on_batch: Callable[[int], None] | None = None,
    keep_logits: bool = False,
    probe_report=None,
    forced: Sequence[Sequence[int]] | None = None,
    sampling: Sampling = GREEDY,
    seeds: Sequence[int] | None = None,
) -> DecodeOutput:
    """Decode ``prompts`` in consecutive batches of ``batch_size`` under ``policy``.

    ``probe_report``: the probe to plan with (default: :func:`mgaudit.decoding.invariance.probe`
    on this machine, cached). ``forced``: per prompt, the tokens to feed (teacher forcing; see the
    module doc); ``max_new_tokens`` is then ignored. ``sampling``: greedy (the default) or seeded
    sampling; ``seeds``: per prompt, its draw seed (default: ``sampling.draw_seed(str(i))`` for the
    prompt at position ``i``; the CLI derives them from the prompt ids). Prompt ``i`` is identical
    to ``reference_decode(..., sampling=sampling, seed=seeds[i])`` under an exact policy.
    """
    policy.validate(batch_size)
    sampling.validate()
    if forced is not None and len(forced) != len(prompts):
        raise UsageError(f"`forced` holds {len(forced)} token lists for {len(prompts)} prompts")
    if seeds is None:
        seeds = [sampling.draw_seed(str(i)) for i in range(len(prompts))]
    elif len(seeds) != len(prompts):
        raise UsageError(f"`seeds` holds {len(seeds)} draw seeds for {len(prompts)} prompts")
    _check_architecture(model, policy)
    plan, evidence = None, None
    rows = min(batch_size, len(prompts))
    if policy.ragged:
        plan, evidence = _planned(model, policy, rows, probe_report)
    t0 = time.perf_counter()
    out: list[SequenceResult] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        rule = sample_rule(sampling, seeds[start:start + batch_size], policy.threshold)
        out.extend(decode_batch(model, batch, policy, max_new_tokens, eos_ids, pad_id, plan=plan,
                                keep_logits=keep_logits, row_offset=start,
                                forced=forced[start:start + batch_size] if forced is not None else None,
                                rule=rule))
        if on_batch:
            on_batch(len(batch))
    seconds = time.perf_counter() - t0
    max_rows = None
    if plan is not None:
        chunks = [p.chunk or p.fixed_rows or rows for p in plan.ops.values()] or [rows]
        max_rows = policy.max_rows or min(chunks)
    return DecodeOutput(out, seconds, max_rows, plan=plan.describe() if plan else {},
                        lowered=list(plan.lowered) if plan else [], probe=evidence, contract=policy.contract,
                        audit_every=policy.audit_every if policy.audits else None,
                        sampling=None if sampling.greedy else {**sampling.key(), "seeds": list(seeds)})


def _planned(model, policy: DecodePolicy, rows: int, report) -> tuple[Plan, dict[str, Any]]:
    """The ragged path's plan for ``rows`` rows, from the probe (run or given), and its evidence."""
    from .invariance import probe, sharing_checks

    if report is None:
        report = probe(model, max(rows, 2), contract=policy.contract)
    elif policy.contract == "batch-invariant":
        sharing_checks(model, report)
    if policy.contract == "batch-invariant":
        bad = [o.key for o in report.ops if o.fixed_rows_ok is False]
        if bad:
            raise UsageError(f"the batch-invariant kernels are not batch-invariant on this machine: in a "
                             f"{report.fixed_rows}-row product a row's result depends on its position or on "
                             f"the other rows for {', '.join(bad)}", hint="use the solo `contract`")
    plan = plan_for(report, rows, max_rows=policy.max_rows, contract=policy.contract, model=model)
    return plan, report.summary()


def _check_architecture(model, policy: DecodePolicy) -> None:
    """Refuse, before any decoding, a model whose features the exact policies do not handle."""
    from .architectures import check_supported

    check_supported(model, policy.name)
