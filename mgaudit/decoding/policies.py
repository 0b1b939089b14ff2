"""Batched greedy decoding under a policy, with margin-gated verification and drift audits.

Policies (see docs/design.md for why):

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
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .cache_ops import (batch_cache, cache_layers, columns_equal, pad_cache_left, pad_columns_left, row_cache,
                        write_columns)
from . import step as _step
from .loop import Padded, greedy, padded_prefill
from .step import left_pad, new_cache, top2_stats
from ..errors import UsageError

POLICIES = ("none", "always", "gate", "invariant")
FAST_PATHS = ("ragged", "padded")
CONTRACTS = ("solo", "batch-invariant")
#: Default audit interval: every row is checked at batch size 1 at least every K steps.
AUDIT_EVERY = 16


@dataclass
class DecodePolicy:
    name: str = "gate"
    threshold: float | None = None  # gate: verify when batched_margin < threshold
    fast_path: str = "ragged"  # gate only: ragged (exact design) or padded (paper's design)
    max_rows: int | None = None  # force every GEMM into chunks of this many rows; None = probe
    contract: str = "solo"  # solo | batch-invariant
    audit_every: int | None = AUDIT_EVERY  # gate on the ragged path: check each row at least every K steps

    def validate(self) -> None:
        if self.name not in POLICIES:
            raise UsageError(f"policy {self.name!r} is not one of {', '.join(POLICIES)}")
        if self.fast_path not in FAST_PATHS:
            raise UsageError(f"fast path {self.fast_path!r} is not one of {', '.join(FAST_PATHS)}")
        if self.contract not in CONTRACTS:
            raise UsageError(f"contract {self.contract!r} is not one of {', '.join(CONTRACTS)}")
        if self.name == "gate":
            if self.threshold is None:
                raise UsageError("policy gate needs a threshold", hint="give a gate file or a threshold")
            if not self.threshold >= 0:
                raise UsageError(f"threshold {self.threshold} must be >= 0")
        if self.max_rows is not None and self.max_rows < 1:
            raise UsageError(f"max rows {self.max_rows} must be at least 1")
        if self.audit_every is not None and self.audit_every < 1:
            raise UsageError(f"audit interval {self.audit_every} must be at least 1")
        if self.contract == "batch-invariant" and not self.ragged and self.name != "none":
            raise UsageError(f"policy {self.name} has no batch-invariant form",
                             hint="use invariant or gate (ragged fast path) under that contract")

    @property
    def solo_prefill(self) -> bool:
        return self.name in ("always", "invariant") or (self.name == "gate" and self.fast_path == "ragged")

    @property
    def ragged(self) -> bool:
        return self.name == "invariant" or (self.name == "gate" and self.fast_path == "ragged")

    @property
    def audits(self) -> bool:
        """Whether checks are bitwise drift audits with rollback (the ragged gate)."""
        return self.name == "gate" and self.fast_path == "ragged"

    def verifies(self, margin: float) -> bool:
        if self.name == "always":
            return True
        if self.name == "gate":
            return margin < self.threshold
        return False


@dataclass
class DriftEvent:
    """A check found the fast path's logits or K/V column different from the batch-1 computation."""

    row: int  # index of the sequence in the decoded prompt list
    step: int
    what: str  # "logits", "kv" or "logits+kv"
    replayed_from: int  # last checked step the row was restored to
    replayed_steps: int
    op: str | None = None  # the op found to differ (None: not attributed)
    rows: int | None = None  # rows that op ran when it differed
    lowered_to: str | None = None  # how that op runs from then on
    token_changed: bool = False


@dataclass
class SequenceResult:
    """One prompt's output under a policy."""

    tokens: list[int] = field(default_factory=list)
    margins: list[float] = field(default_factory=list)  # fast-path (batched) margins: what the gate saw
    verified: list[bool] = field(default_factory=list)  # checked at batch size 1 at this step
    repaired: list[bool] = field(default_factory=list)  # token differs from the fast path's
    audited: list[bool] = field(default_factory=list)  # checked because an audit was due (not the margin)
    drift: list[DriftEvent] = field(default_factory=list)
    logits: list[torch.Tensor] | None = None  # per step, when asked (keep_logits)

    @property
    def triggers(self) -> int:
        return sum(1 for v, a in zip(self.verified, self.audited) if v and not a)

    @property
    def audits(self) -> int:
        return sum(self.audited)

    @property
    def repairs(self) -> int:
        return sum(self.repaired)

    def _truncate(self, n: int) -> None:
        for lst in (self.tokens, self.margins, self.verified, self.repaired, self.audited):
            del lst[n:]
        if self.logits is not None:
            del self.logits[n:]


@dataclass
class DecodeOutput:
    sequences: list[SequenceResult]
    seconds: float
    max_rows: int | None  # smallest GEMM chunk in the plan (None: no ragged path)
    plan: dict[str, str] = field(default_factory=dict)  # ops not run as one batched product, and how
    lowered: list[dict[str, Any]] = field(default_factory=list)  # plan changes made after drift
    probe: dict[str, Any] | None = None  # the probe's evidence (ragged path)
    contract: str = "solo"
    audit_every: int | None = None

    @property
    def drift_events(self) -> list[DriftEvent]:
        return [e for s in self.sequences for e in s.drift]


def _truncated_copy(model, cache, drop: int = 1):
    """A new batch cache holding all but the last ``drop`` columns of ``cache``."""
    out = new_cache(model)
    for i, layer in enumerate(cache_layers(cache)):
        out.update(layer.keys[:, :, :-drop].clone(), layer.values[:, :, :-drop].clone(), i)
    return out


class _Batch:
    """The state of one batch being decoded; the loop below is the only thing that advances it."""

    def __init__(self, model, prompts, verifier_plan, max_new_tokens, eos_ids, pad_id, keep_logits, row_offset,
                 bucket=None):
        self.model, self.verifier_plan = model, verifier_plan
        self.device = model.device
        self.bsz = len(prompts)
        self.eos = set(int(e) for e in eos_ids)
        self.pad_id = pad_id
        self.max_new = max_new_tokens
        self.results = [SequenceResult(logits=[] if keep_logits else None) for _ in range(self.bsz)]
        self.lengths = [len(p) for p in prompts]
        # the batch-invariant attention pads rows to a multiple of `bucket` columns from a zero margin
        self.bucket = bucket
        self.margin = bucket - 1 if bucket else 0
        self.width = max(self.lengths) + self.margin
        self.starts = [self.width - n for n in self.lengths]
        self.done = [False] * self.bsz
        self.certified = [0] * self.bsz  # last step whose logits (and all earlier columns) were checked
        self.row_offset = row_offset

    # -- one forward of one row at batch size 1, as solo decoding runs it
    def solo_step(self, one, token: int, position: int) -> torch.Tensor:
        from .invariance import decode_kernels

        ids = torch.tensor([[token]], dtype=torch.long, device=self.device)
        pos = torch.tensor([[position]], dtype=torch.long, device=self.device)
        with contextlib.ExitStack() as stack:
            if self.bucket:
                from .ragged import ragged_step

                stack.enter_context(ragged_step(self.model, [self.margin], bucket=self.bucket))
            stack.enter_context(decode_kernels(self.model, self.verifier_plan))
            return _step.forward_last(self.model, ids, None, pos, one)

    def row_cache(self, cache, b: int, end: int):
        """Row ``b``'s columns up to ``end`` as a batch-1 cache (with the zero margin, if any)."""
        return row_cache(self.model, cache, b, self.starts[b] - self.margin, end)


@torch.inference_mode()
def decode_batch(
    model,
    prompts: Sequence[Sequence[int]],
    policy: DecodePolicy,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    pad_id: int,
    max_rows: int | None = None,
    plan=None,
    keep_logits: bool = False,
    row_offset: int = 0,
) -> list[SequenceResult]:
    """Greedy-decode one batch of prompts under ``policy``.

    ``plan`` (an :class:`mgaudit.decoding.invariance.Plan`) says how each op runs on the ragged
    path; ``max_rows`` is the older override (every linear layer in chunks of that many
    rows). Drift events lower ops in ``plan`` in place.
    """
    from .invariance import Plan, decode_kernels, fixed_rows_of, fixed_rows_plan, localize, plan_for
    from .packed import packed_prefill, supported as packed_supported
    from .ragged import bucketed_attention, ragged_step

    fixed = None
    if policy.contract == "batch-invariant":
        fixed = fixed_rows_plan(model)
    if plan is None:
        if fixed is not None and policy.ragged:
            plan = fixed
        elif policy.ragged and max_rows:
            plan = plan_for(None, len(prompts), max_rows=max_rows, model=model)
        else:
            plan = Plan()
    # the verifier runs one row through the kernels of the contract
    verifier_plan = fixed if fixed is not None else Plan()
    bucket = bucketed_attention(model) if fixed is not None and policy.ragged else None
    st = _Batch(model, prompts, verifier_plan, max_new_tokens, eos_ids, pad_id, keep_logits, row_offset, bucket)
    bsz, starts, lengths = st.bsz, st.starts, st.lengths
    results = st.results

    # the prefill: the strategy the policy and contract ask for
    if not policy.solo_prefill:
        # generate-style batched prefill; sliding layers keep the columns a verifier copies
        logits, cache, positions, padded = padded_prefill(model, prompts, pad_id, cache=batch_cache(model))
    elif fixed is not None and policy.ragged and packed_supported(model):
        # the batch-invariant prefill: prompts packed, fixed-size GEMM chunks, attention per prompt
        logits, kv = packed_prefill(model, prompts, fixed_rows_of(fixed), shared=plan.prefill_shared)
        cache = pad_columns_left([[(k, v, 0) for k, v in row] for row in kv], lengths, st.margin)
    else:
        caches, rows = [], []
        for p in prompts:
            c = new_cache(model)
            ids = torch.tensor([list(p)], dtype=torch.long, device=st.device)
            # exactly what solo decoding (and generate at batch size 1) runs
            rows.append(_step.forward_last(model, ids, None, torch.arange(len(p), device=st.device)[None], c))
            caches.append(c)
        logits = torch.cat(rows)
        cache = pad_cache_left(model, caches, lengths, margin=st.margin)
    if policy.solo_prefill:
        positions = torch.tensor(lengths, dtype=torch.long, device=st.device)[:, None] - 1
        if not policy.ragged:  # always: the verified padded batch
            padded = Padded(model, left_pad(prompts, pad_id, st.device)[1])

    def ragged_forward(c, fed, pos):
        with ragged_step(model, starts, bucket=bucket, share_span=plan.attention_span), decode_kernels(model, plan):
            return _step.forward_last(model, fed, None, pos, c)

    advance = ragged_forward if policy.ragged else padded
    audit_every = policy.audit_every if policy.audits else None
    for s in greedy(logits, cache, positions, advance, eos_ids=eos_ids, pad_id=pad_id,
                    budgets=[max_new_tokens] * bsz):
        step, tok = s.index, s.chosen
        st.done = [not a for a in s.active]
        verified_now = [False] * bsz
        repaired_now = [False] * bsz
        audited_now = [False] * bsz
        step_logits = [s.logits[b] for b in range(bsz)] if keep_logits else None
        if step > 0 and policy.name in ("always", "gate"):
            total = cache.get_seq_length()
            drifted = []
            for b in range(bsz):
                if st.done[b]:
                    continue
                low = policy.verifies(s.margin(b))
                finishing = tok[b] in st.eos or len(results[b].tokens) + 1 >= max_new_tokens
                due = audit_every is not None and (step - st.certified[b] >= audit_every or finishing)
                if not (low or due):
                    continue
                one = st.row_cache(cache, b, total - 1)
                solo_logits = st.solo_step(one, s.fed[b].item(), int(s.positions[b]))
                verified_now[b] = True
                audited_now[b] = not low
                if not policy.audits:
                    # always, or the paper's padded gate: keep the verifier's token and K/V column
                    s_tok = int(torch.argmax(solo_logits, dim=-1))
                    write_columns(cache, one, b)
                    if s_tok != tok[b]:
                        repaired_now[b] = True
                        tok[b] = s_tok
                    if keep_logits:
                        step_logits[b] = solo_logits[0]
                    continue
                same_logits = torch.equal(solo_logits[0].float(), s.logits[b].float())
                same_kv = columns_equal(cache, one, b)
                if same_logits and same_kv:
                    st.certified[b] = step
                    continue
                what = "+".join(w for w, ok in (("logits", same_logits), ("kv", same_kv)) if not ok)
                drifted.append((b, what, one, solo_logits))
            if drifted:
                # Attribute first (the batched step is replayed on the cache as it was), then repair.
                attribution = None
                if policy.ragged:
                    before = _truncated_copy(model, cache)

                    def replay_step():
                        with ragged_step(model, starts, cache=before, bucket=bucket,
                                         share_span=plan.attention_span):  # its sliding layers hold only the window
                            _step.forward_last(model, s.fed, None, s.positions, before)

                    attribution = localize(model, plan, replay_step)
                lowered_to = None
                if attribution is not None:
                    key, rows_ran = attribution
                    lowered_to = plan.lower(key, max(1, rows_ran // 2) if rows_ran > 2 else 1,
                                            f"drift at step {step}").describe()
                for b, what, one, solo_logits in drifted:
                    event = _repair_row(st, cache, b, step, what, one, solo_logits, tok, step_logits)
                    if attribution is not None:
                        event.op, event.rows, event.lowered_to = attribution[0], attribution[1], lowered_to
                    results[b].drift.append(event)
                    repaired_now[b] = event.token_changed
        for b in range(bsz):
            if st.done[b] or tok[b] is None:
                continue
            r = results[b]
            r.tokens.append(tok[b])
            r.margins.append(s.margin(b))
            r.verified.append(verified_now[b])
            r.repaired.append(repaired_now[b])
            r.audited.append(audited_now[b])
            if keep_logits:
                r.logits.append(step_logits[b].detach().float().cpu().clone())
    return results


def _repair_row(st: _Batch, cache, b: int, step: int, what: str, one, solo_logits, tok, step_logits) -> DriftEvent:
    """Make row ``b`` exact again after a drift event at ``step``.

    If the previous step was the last checked one, the batch-1 recomputation just done
    is the solo computation: keep its column and token. Otherwise restore the row's
    cache to its last checked state and replay the steps since at batch size 1.
    """
    r = st.results[b]
    c = st.certified[b]
    old_tok = tok[b]
    if c == step - 1:
        write_columns(cache, one, b)
        logits_b = solo_logits
        replayed = 0
    else:
        # columns up to the one fed at step c: [starts[b], width + c)
        one = st.row_cache(cache, b, st.width + c)
        prev = r.tokens[c]
        logits_b = None
        replayed = 0
        for j in range(c + 1, step + 1):
            logits_b = st.solo_step(one, prev, st.lengths[b] + j - 1)
            replayed += 1
            if j == step:
                break
            t, _, a1, a2 = top2_stats(logits_b)
            r.tokens[j] = t[0]  # margins stay the fast path's (what the gate saw)
            r.verified[j], r.audited[j] = True, True
            if r.logits is not None:
                r.logits[j] = logits_b[0].detach().float().cpu().clone()
            prev = t[0]
            if t[0] in st.eos:
                # the row ends earlier than the fast path said
                r._truncate(j + 1)
                st.done[b] = True
                break
        if not st.done[b]:
            write_columns(cache, one, b, replayed)
    event = DriftEvent(st.row_offset + b, step, what, c, replayed)
    if st.done[b]:
        tok[b] = None  # nothing more for this row
        event.token_changed = True
        return event
    tok[b] = top2_stats(logits_b)[0][0]
    if step_logits is not None:
        step_logits[b] = logits_b[0]
    st.certified[b] = step
    event.token_changed = tok[b] != old_tok
    return event


def reference_decode(model, prompt: Sequence[int], max_new_tokens: int, eos_ids: Sequence[int],
                     contract: str = "solo", keep_logits: bool = False) -> SequenceResult:
    """The batch-1 reference a policy is checked against under ``contract``.

    ``solo``: stock kernels, what ``generate`` gives for the prompt alone.
    ``batch-invariant``: the same prompt alone through the fixed-row-count kernels.
    """
    from .stock import solo_decode

    if contract == "solo":
        tr = solo_decode(model, prompt, max_new_tokens, eos_ids, keep_logits=keep_logits)
        res = SequenceResult(tokens=list(tr.tokens), margins=tr.margins, verified=[False] * len(tr),
                             repaired=[False] * len(tr), audited=[False] * len(tr),
                             logits=[t.float() for t in tr.logits] if keep_logits else None)
        return res
    pol = DecodePolicy("invariant", contract=contract)
    return decode_batch(model, [prompt], pol, max_new_tokens, eos_ids, pad_id=0, keep_logits=keep_logits)[0]


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
) -> DecodeOutput:
    """Decode ``prompts`` in consecutive batches of ``batch_size`` under ``policy``."""
    from .invariance import plan_for, probe

    policy.validate()
    if batch_size < 1:
        raise UsageError(f"batch size {batch_size} must be at least 1")
    _check_architecture(model, policy)
    plan, evidence = None, None
    rows = min(batch_size, len(prompts))
    if policy.ragged:
        report = probe_report
        if report is None:
            report = probe(model, max(rows, 2))
        if policy.contract == "batch-invariant" and report is not None:
            bad = [o.key for o in report.ops if o.fixed_rows_ok is False]
            if bad:
                raise UsageError(f"the batch-invariant kernels are not batch-invariant on this machine: in a "
                                 f"{report.fixed_rows}-row product a row's result depends on its position or on "
                                 f"the other rows for {', '.join(bad)}", hint="use the solo contract")
        plan = plan_for(report, rows, max_rows=policy.max_rows, contract=policy.contract, model=model)
        evidence = report.summary() if report is not None else None
    t0 = time.perf_counter()
    out: list[SequenceResult] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        out.extend(decode_batch(model, batch, policy, max_new_tokens, eos_ids, pad_id, plan=plan,
                                keep_logits=keep_logits, row_offset=start))
        if on_batch:
            on_batch(len(batch))
    seconds = time.perf_counter() - t0
    max_rows = None
    if plan is not None:
        chunks = [p.chunk or p.fixed_rows or rows for p in plan.ops.values()] or [rows]
        max_rows = policy.max_rows or min(chunks)
    return DecodeOutput(out, seconds, max_rows, plan=plan.describe() if plan else {},
                        lowered=list(plan.lowered) if plan else [], probe=evidence, contract=policy.contract,
                        audit_every=policy.audit_every if policy.audits else None)


def _check_architecture(model, policy: DecodePolicy) -> None:
    """Refuse, before any decoding, a model whose features the exact policies do not handle."""
    try:
        from .architectures import check_supported
    except ImportError:
        return
    check_supported(model, policy.name)
