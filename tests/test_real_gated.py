"""The default model (SmolLM2-135M-Instruct, bfloat16, CPU): policies reproduce solo exactly.

All tests are ``slow``: run them with ``pytest -m slow tests/test_real_gated.py``.
Six ``chat`` prompts (of different lengths) in one batch of six, 24 new tokens,
for every exact policy (about a minute on two CPU cores).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from mgaudit.engine import solo_decode
from mgaudit.gated import DecodePolicy, decode
from mgaudit.prompts import encode_prompt, load_prompts

pytestmark = pytest.mark.slow

N, MAX_NEW, BATCH = 6, 24, 6


@pytest.fixture(scope="module")
def chat(real_lm):
    prompts = load_prompts("chat", limit=N).prompts
    ids = [encode_prompt(real_lm.tokenizer, p) for p in prompts]
    assert len(ids) == N and len({len(p) for p in ids}) > 1  # different lengths: a padded batch
    eos, pad = real_lm.eos_token_ids, real_lm.pad_token_id
    solos = [solo_decode(real_lm.model, p, MAX_NEW, eos).tokens for p in ids]
    return SimpleNamespace(model=real_lm.model, ids=ids, eos=eos, pad=pad, solos=solos,
                           pids=[p.id for p in prompts])


def _assert_same(out, solos, pids) -> None:
    assert len(out.sequences) == len(solos)
    diverged = []
    for pid, r, s in zip(pids, out.sequences, solos):
        if r.tokens != s:
            first = next((i for i, (a, b) in enumerate(zip(r.tokens, s)) if a != b), min(len(r.tokens), len(s)))
            diverged.append((pid, first))
    assert not diverged, f"sequences that differ from solo (prompt, first step): {diverged}"


def test_invariant_reproduces_solo(chat) -> None:
    out = decode(chat.model, chat.ids, DecodePolicy("invariant"), BATCH, MAX_NEW, chat.eos, chat.pad)
    _assert_same(out, chat.solos, chat.pids)
    assert all(r.triggers == 0 for r in out.sequences)
    assert isinstance(out.max_rows, int) and 1 <= out.max_rows <= BATCH


def test_gate_reproduces_solo(chat) -> None:
    out = decode(chat.model, chat.ids, DecodePolicy("gate", 0.5), BATCH, MAX_NEW, chat.eos, chat.pad)
    _assert_same(out, chat.solos, chat.pids)
    for r in out.sequences:
        assert r.repairs <= r.triggers
        assert r.verified == [i > 0 and m < 0.5 for i, m in enumerate(r.margins)]


def test_always_reproduces_solo(chat) -> None:
    out = decode(chat.model, chat.ids, DecodePolicy("always"), BATCH, MAX_NEW, chat.eos, chat.pad)
    _assert_same(out, chat.solos, chat.pids)
    for r in out.sequences:
        assert r.triggers == len(r.tokens) - 1
