"""The default model (SmolLM2-135M-Instruct, bfloat16, CPU): the exact policies reproduce their
reference bit for bit, at the thread count the benchmarks use and a batch of eight.

All tests are ``slow``. The expectation never depends on one CPU's kernels: the ragged path runs
the plan the invariance probe made on this machine, and ``max_rows`` only caps the rows per
product inside that plan, so every configuration below must be exact on any CPU.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from mgaudit.decoding.policies import DecodePolicy, decode, reference_decode
from mgaudit.prompts import encode_prompt, load_prompts

pytestmark = pytest.mark.slow

N, MAX_NEW, BATCH = 8, 24, 8


@pytest.fixture(scope="module")
def chat(real_lm):
    old = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("MGAUDIT_BENCH_THREADS", "0")) or (os.cpu_count() or 1))
    try:
        prompts = load_prompts("chat", limit=N).prompts
        ids = [encode_prompt(real_lm.tokenizer, p) for p in prompts]
        assert len(ids) == N and len({len(p) for p in ids}) > 1  # different lengths: a ragged batch
        eos, pad = real_lm.eos_token_ids, real_lm.pad_token_id
        refs = {c: [reference_decode(real_lm.model, p, MAX_NEW, eos, contract=c) for p in ids]
                for c in ("solo", "batch-invariant")}
        yield SimpleNamespace(model=real_lm.model, ids=ids, eos=eos, pad=pad, refs=refs, pids=[p.id for p in prompts])
    finally:
        torch.set_num_threads(old)


def _assert_same(out, refs, pids) -> None:
    assert len(out.sequences) == len(refs)
    diverged = []
    for pid, r, s in zip(pids, out.sequences, refs):
        if r.tokens != s.tokens:
            first = next((i for i, (a, b) in enumerate(zip(r.tokens, s.tokens)) if a != b),
                         min(len(r.tokens), len(s.tokens)))
            diverged.append((pid, first))
    assert not diverged, f"sequences that differ from the reference (prompt, first step): {diverged}"


@pytest.mark.parametrize("max_rows", [1, 2, 4, None], ids=["rows-1", "rows-2", "rows-4", "probed"])
def test_invariant_reproduces_solo(chat, max_rows) -> None:
    out = decode(chat.model, chat.ids, DecodePolicy("invariant", max_rows=max_rows), BATCH, MAX_NEW, chat.eos,
                 chat.pad)
    _assert_same(out, chat.refs["solo"], chat.pids)
    assert all(r.triggers == 0 and not r.drift for r in out.sequences)
    assert out.probe is not None and out.probe["up_to"] >= BATCH
    # every op the probe limited below the batch runs in another layout or in chunks
    for key in out.probe["limited"]:
        assert key in out.plan, (key, out.plan)


def test_gate_reproduces_solo_and_reports_its_checks(chat) -> None:
    out = decode(chat.model, chat.ids, DecodePolicy("gate", 0.5), BATCH, MAX_NEW, chat.eos, chat.pad)
    _assert_same(out, chat.refs["solo"], chat.pids)
    for r in out.sequences:
        assert r.repairs <= sum(r.verified)
        assert [v and not a for v, a in zip(r.verified, r.audited)] == \
            [i > 0 and m < 0.5 for i, m in enumerate(r.margins)]
        assert r.verified[-1]  # the last step of every row is checked
    assert out.audit_every is not None
    # drift on this machine is possible (then it was repaired); it must be reported with its op
    for e in out.drift_events:
        assert e.replayed_steps >= 1


def test_always_reproduces_solo(chat) -> None:
    out = decode(chat.model, chat.ids, DecodePolicy("always"), BATCH, MAX_NEW, chat.eos, chat.pad)
    _assert_same(out, chat.refs["solo"], chat.pids)
    for r in out.sequences:
        assert r.triggers == len(r.tokens) - 1


def _bi_probe(chat, fixed_rows_ok: bool):
    """This machine's probe with the batch-invariant contract's sharing checks, its fixed-row verdict
    set to ``fixed_rows_ok`` for every linear layer: the branch of the contract a test needs, on
    any CPU (the verdict itself is tested on the tiny model: test_drift.py)."""
    from mgaudit.decoding.invariance import probe

    rep = probe(chat.model, BATCH, contract="batch-invariant")
    for o in rep.ops:
        if o.kind == "linear":
            o.fixed_rows_ok = fixed_rows_ok
    return rep


@pytest.mark.parametrize("policy", ["invariant", "gate"])
def test_batch_invariant_contract_reproduces_its_reference(chat, policy) -> None:
    """The contract accepted: the batched output equals each prompt alone through the same kernels
    (16-row GEMMs whose rows depend neither on their position nor on the other rows)."""
    pol = DecodePolicy(policy, 0.5 if policy == "gate" else None, contract="batch-invariant")
    out = decode(chat.model, chat.ids, pol, BATCH, MAX_NEW, chat.eos, chat.pad, probe_report=_bi_probe(chat, True))
    _assert_same(out, chat.refs["batch-invariant"], chat.pids)
    assert out.probe["fixed_rows_ok"] is True and out.probe["prefill"] is not None


def test_batch_invariant_contract_is_refused_where_fixed_rows_depend_on_the_batch(chat) -> None:
    from mgaudit.errors import UsageError

    pol = DecodePolicy("invariant", contract="batch-invariant")
    with pytest.raises(UsageError, match="not batch-invariant on this machine"):
        decode(chat.model, chat.ids, pol, BATCH, MAX_NEW, chat.eos, chat.pad, probe_report=_bi_probe(chat, False))
