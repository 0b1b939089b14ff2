"""Batched greedy decoding under a policy, with margin-gated verification.

Policies (see docs/design.md for why):

``none``
    What ``generate`` does with a batch: left-padded batched prefill and decode
    with a padding mask. Fast, not batch-invariant.
``always``
    LLM-42-style: solo prefill, padded batched decode, and every step of every
    row recomputed at batch size 1 on the row's own cache; the verifier's token
    and K/V column are kept. Exact by induction, costs more than solo.
``gate``
    Solo prefill, then *ragged* batched decode: projections, norms and MLP as
    batched GEMMs (split into chunks of at most ``max_rows`` rows, the measured
    row-invariant range), attention per row over its own unpadded K/V. A step
    whose batched top-1/top-2 margin is below ``threshold`` is verified at batch
    size 1; a mismatch is repaired (solo token taken, K/V column replaced).
    ``fast_path="padded"`` gives the paper's design instead (padded batched
    prefill and decode, verified below tau): kept to measure that it is not exact.
``invariant``
    The ``gate`` fast path with no verification: exact where the invariance
    probe holds.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .cache_ops import pad_cache_left, row_cache, write_columns
from .engine import _forward_last, left_pad, new_cache, top2_stats
from .errors import UsageError

POLICIES = ("none", "always", "gate", "invariant")
FAST_PATHS = ("ragged", "padded")


@dataclass
class DecodePolicy:
    name: str = "gate"
    threshold: float | None = None  # gate: verify when batched_margin < threshold
    fast_path: str = "ragged"  # gate only: ragged (exact design) or padded (paper's design)
    max_rows: int | None = None  # GEMM rows per chunk on the ragged path; None = probe

    def validate(self) -> None:
        if self.name not in POLICIES:
            raise UsageError(f"--policy {self.name!r} is not one of {', '.join(POLICIES)}")
        if self.fast_path not in FAST_PATHS:
            raise UsageError(f"--fast-path {self.fast_path!r} is not one of {', '.join(FAST_PATHS)}")
        if self.name == "gate":
            if self.threshold is None:
                raise UsageError("--policy gate needs a threshold", hint="pass --gate gate.json or --threshold TAU")
            if not self.threshold >= 0:
                raise UsageError(f"--threshold {self.threshold} must be >= 0")
        if self.max_rows is not None and self.max_rows < 1:
            raise UsageError(f"--max-rows {self.max_rows} must be at least 1")

    @property
    def solo_prefill(self) -> bool:
        return self.name in ("always", "invariant") or (self.name == "gate" and self.fast_path == "ragged")

    @property
    def ragged(self) -> bool:
        return self.name == "invariant" or (self.name == "gate" and self.fast_path == "ragged")

    def verifies(self, margin: float) -> bool:
        if self.name == "always":
            return True
        if self.name == "gate":
            return margin < self.threshold
        return False


@dataclass
class SequenceResult:
    """One prompt's output under a policy."""

    tokens: list[int] = field(default_factory=list)
    margins: list[float] = field(default_factory=list)  # fast-path (batched) margins
    verified: list[bool] = field(default_factory=list)
    repaired: list[bool] = field(default_factory=list)

    @property
    def triggers(self) -> int:
        return sum(self.verified)

    @property
    def repairs(self) -> int:
        return sum(self.repaired)


@dataclass
class DecodeOutput:
    sequences: list[SequenceResult]
    seconds: float
    max_rows: int | None


@torch.inference_mode()
def decode_batch(
    model,
    prompts: Sequence[Sequence[int]],
    policy: DecodePolicy,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    pad_id: int,
    max_rows: int | None = None,
) -> list[SequenceResult]:
    """Greedy-decode one batch of prompts under ``policy``."""
    from .invariance import row_chunked_linears
    from .ragged import ragged_step

    device = model.device
    bsz = len(prompts)
    eos = set(int(e) for e in eos_ids)
    results = [SequenceResult() for _ in range(bsz)]
    lengths = [len(p) for p in prompts]
    width = max(lengths)

    if not policy.solo_prefill:
        # generate-style batched prefill; the decode below continues on its cache
        ids, mask, pos = left_pad(prompts, pad_id, device)
        cache = new_cache(model)
        logits = _forward_last(model, ids, mask, pos, cache)
    else:
        caches, rows = [], []
        for p in prompts:
            c = new_cache(model)
            ids = torch.tensor([list(p)], dtype=torch.long, device=device)
            m = torch.ones_like(ids)
            rows.append(_forward_last(model, ids, m, m.cumsum(-1) - 1, c))
            caches.append(c)
        logits = torch.cat(rows)
        cache = pad_cache_left(model, caches, lengths)
        _, mask, _ = left_pad(prompts, pad_id, device)
    starts = [width - n for n in lengths]
    next_pos = torch.tensor(lengths, dtype=torch.long, device=device)[:, None]
    done = [False] * bsz
    chunk = max_rows if (policy.ragged and max_rows) else None
    last_fed = None  # the tokens fed at the previous step (what a verifier recomputes)

    for step in range(max_new_tokens):
        tok, _, t1, t2 = top2_stats(logits)
        verified_now = [False] * bsz
        repaired_now = [False] * bsz
        if step > 0 and policy.name in ("always", "gate"):
            # Verify this step's rows whose margin is low: recompute the step at
            # batch size 1 on the row's cache (without the column the fast path
            # just appended), keep the solo token and K/V column.
            total = cache.get_seq_length()
            for b in range(bsz):
                if done[b] or not policy.verifies(t1[b] - t2[b]):
                    continue
                one = row_cache(model, cache, b, starts[b], total - 1)
                n = total - starts[b]
                m1 = torch.ones((1, n), dtype=torch.long, device=device)
                solo_logits = _forward_last(model, last_fed[b:b + 1], m1, next_pos[b:b + 1] - 1, one)
                s_tok = int(torch.argmax(solo_logits, dim=-1))
                write_columns(cache, one, b)
                verified_now[b] = True
                if s_tok != tok[b]:
                    repaired_now[b] = True
                    tok[b] = s_tok
        feed = []
        for b in range(bsz):
            if done[b]:
                feed.append(pad_id)
                continue
            r = results[b]
            r.tokens.append(tok[b])
            r.margins.append(t1[b] - t2[b])
            r.verified.append(verified_now[b])
            r.repaired.append(repaired_now[b])
            if tok[b] in eos or len(r.tokens) >= max_new_tokens:
                done[b] = True
            feed.append(tok[b])
        if all(done):
            break
        last_fed = torch.tensor(feed, dtype=torch.long, device=device)[:, None]
        if policy.ragged:
            with ragged_step(model, starts), (row_chunked_linears(model, chunk) if chunk and chunk < bsz
                                              else contextlib.nullcontext()):
                logits = _forward_last(model, last_fed, None, next_pos, cache)
        else:
            mask = torch.cat([mask, torch.ones((bsz, 1), dtype=mask.dtype, device=device)], dim=-1)
            logits = _forward_last(model, last_fed, mask, next_pos, cache)
        next_pos = next_pos + 1
    return results


def decode(
    model,
    prompts: Sequence[Sequence[int]],
    policy: DecodePolicy,
    batch_size: int,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    pad_id: int,
    on_batch: Callable[[int], None] | None = None,
) -> DecodeOutput:
    """Decode ``prompts`` in consecutive batches of ``batch_size`` under ``policy``."""
    from .invariance import invariant_rows

    policy.validate()
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size} must be at least 1")
    max_rows = None
    if policy.ragged:
        max_rows = policy.max_rows or invariant_rows(model, min(batch_size, len(prompts)))
    t0 = time.perf_counter()
    out: list[SequenceResult] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        out.extend(decode_batch(model, batch, policy, max_new_tokens, eos_ids, pad_id, max_rows))
        if on_batch:
            on_batch(len(batch))
    return DecodeOutput(out, time.perf_counter() - t0, max_rows)
