"""The decode loops of ``mgaudit.decoding.stock`` against ``model.generate`` (tiny random model, CPU)."""

from __future__ import annotations

import math

import pytest
import torch

from mgaudit.decoding.step import top2_stats
from mgaudit.decoding.stock import RowTrace, padded_decode, solo_decode
from conftest import cut_after_eos
from mgaudit.prompts import Prompt, encode_prompt
from tiny_tokenizer import build_tiny_tokenizer

TEXTS = [
    "what is the sum of two and three",
    "how many apples",
    "write a python function that returns the first number of a list",
    "explain why the train was long",
    "give a short answer",
]
SAME_LENGTH = [  # five words each: identical token counts, so no padding in a batch
    "what is the first number",
    "how many apples are there",
    "tell me about the city",
    "give a short good answer",
]
MAX_NEW = 12


def _enc(lm, text: str, chat: bool = True) -> list[int]:
    return encode_prompt(lm.tokenizer, Prompt(id="t", text=text, messages=None), chat=chat)


def _generate(lm, prompts: list[list[int]], max_new: int, eos_id: int) -> list[list[int]]:
    """Greedy ``generate`` on a left-padded batch built by the tokenizer."""
    tok = build_tiny_tokenizer(chat_template=True)  # a private copy: padding_side is mutated
    tok.padding_side = "left"
    batch = tok.pad({"input_ids": [list(p) for p in prompts]}, padding=True, return_tensors="pt")
    width = batch["input_ids"].shape[1]
    assert (batch["attention_mask"].sum(-1).tolist() == [len(p) for p in prompts])
    assert all(batch["attention_mask"][b, -1] == 1 for b in range(len(prompts)))  # left padding
    with torch.inference_mode():
        out = lm.model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            do_sample=False,
            max_new_tokens=max_new,
            eos_token_id=eos_id,
            pad_token_id=lm.pad_token_id,
        )
    return [cut_after_eos(row[width:].tolist(), {eos_id}) for row in out]


@pytest.fixture(scope="module")
def encoded(tiny_lm) -> list[list[int]]:
    return [_enc(tiny_lm, t) for t in TEXTS]


@pytest.fixture(scope="module")
def stop_id(tiny_lm, encoded) -> int:
    """An EOS id that some prompt actually emits mid-way, so stopping is exercised.

    The tiny model rarely emits its real EOS; the token a free run emits at step 3
    is used as the stop token instead (what matters is the stopping rule).
    """
    trace = solo_decode(tiny_lm.model, encoded[0], MAX_NEW, [])
    return trace.tokens[3]


def test_solo_decode_equals_generate(tiny_lm, encoded) -> None:
    eos = tiny_lm.eos_token_ids
    for ids in encoded:
        trace = solo_decode(tiny_lm.model, ids, MAX_NEW, eos)
        want = _generate(tiny_lm, [ids], MAX_NEW, eos[0])[0]
        assert trace.tokens == want
        assert len(trace.runner_up) == len(trace.top1) == len(trace.top2) == len(trace) == len(want)
        assert all(m >= 0 for m in trace.margins)


def test_solo_decode_stops_after_eos_like_generate(tiny_lm, encoded, stop_id) -> None:
    stopped = 0
    for ids in encoded:
        trace = solo_decode(tiny_lm.model, ids, MAX_NEW, [stop_id])
        want = _generate(tiny_lm, [ids], MAX_NEW, stop_id)[0]
        assert trace.tokens == want
        if stop_id in trace.tokens:
            stopped += 1
            assert trace.tokens[-1] == stop_id and trace.tokens.count(stop_id) == 1
            assert len(trace) <= MAX_NEW
        else:
            assert len(trace) == MAX_NEW
    assert stopped >= 1  # the first prompt stops at step 3 by construction


def test_padded_free_run_equals_generate_on_the_same_batch(tiny_lm, encoded, stop_id) -> None:
    assert len({len(p) for p in encoded}) > 1  # really padded
    for eos in (tiny_lm.eos_token_ids[0], stop_id):
        rows = padded_decode(tiny_lm.model, encoded, MAX_NEW, [eos], tiny_lm.pad_token_id)
        want = _generate(tiny_lm, encoded, MAX_NEW, eos)
        assert len(rows) == len(encoded)
        for b, (row, w) in enumerate(zip(rows, want)):
            assert row.tokens == w, f"row {b} (eos {eos})"
            assert row.max_abs_diff == [None] * len(row)  # no reference given


def test_padded_rows_are_independent_of_batch_order(tiny_lm, encoded) -> None:
    rows = padded_decode(tiny_lm.model, encoded, MAX_NEW, [], tiny_lm.pad_token_id)
    rev = padded_decode(tiny_lm.model, encoded[::-1], MAX_NEW, [], tiny_lm.pad_token_id)[::-1]
    # Same batch, same padding per row: the rows must come out the same.
    assert [r.tokens for r in rows] == [r.tokens for r in rev]


def test_teacher_forcing_records_exactly_the_forced_steps(tiny_lm, encoded) -> None:
    forced = [[7 + b] * n for b, n in enumerate([3, 1, 5, 0, 2])]
    eos = tiny_lm.eos_token_ids
    # Forcing EOS mid-way must not stop a forced row either.
    forced[2][1] = eos[0]
    rows = padded_decode(tiny_lm.model, encoded, MAX_NEW, eos, tiny_lm.pad_token_id, forced=forced)
    assert [len(r) for r in rows] == [len(f) for f in forced]
    for r in rows:
        assert len(r.runner_up) == len(r.top1) == len(r.top2) == len(r.max_abs_diff) == len(r)


def test_teacher_forcing_on_solo_tokens_reproduces_them_at_batch_size_one(tiny_lm, encoded) -> None:
    eos = tiny_lm.eos_token_ids
    for ids in encoded[:3]:
        solo = solo_decode(tiny_lm.model, ids, MAX_NEW, eos)
        again = padded_decode(tiny_lm.model, [ids], MAX_NEW, eos, tiny_lm.pad_token_id, forced=[solo.tokens])[0]
        assert again.tokens == solo.tokens
        assert again.top1 == solo.top1 and again.top2 == solo.top2


def test_forced_nothing_records_nothing(tiny_lm, encoded) -> None:
    rows = padded_decode(tiny_lm.model, encoded[:2], MAX_NEW, [], tiny_lm.pad_token_id, forced=[[], []])
    assert [len(r) for r in rows] == [0, 0]


def test_reference_diffs_are_finite_for_unpadded_rows(tiny_lm) -> None:
    prompts = [_enc(tiny_lm, t) for t in SAME_LENGTH]
    assert len({len(p) for p in prompts}) == 1  # no row is padded
    eos = tiny_lm.eos_token_ids
    refs = [solo_decode(tiny_lm.model, p, MAX_NEW, eos, keep_logits=True) for p in prompts]
    for r in refs:
        assert r.logits is not None and len(r.logits) == len(r)
        assert r.logits[0].shape == (len(tiny_lm.tokenizer),)

    sync = padded_decode(tiny_lm.model, prompts, MAX_NEW, eos, tiny_lm.pad_token_id,
                         forced=[r.tokens for r in refs], reference=refs)
    for row, ref in zip(sync, refs):
        assert len(row) == len(ref)
        # Teacher-forced on the reference: every step is compared, and the values are finite.
        assert all(d is not None and math.isfinite(d) and d >= 0 for d in row.max_abs_diff)

    free = padded_decode(tiny_lm.model, prompts, MAX_NEW, eos, tiny_lm.pad_token_id, reference=refs)
    for row, ref in zip(free, refs):
        assert row.max_abs_diff[0] is not None  # the first step always shares the prefix
        for t, d in enumerate(row.max_abs_diff):
            if d is None:  # only after the prefixes parted
                assert row.tokens[:t] != ref.tokens[:t]
            else:
                assert math.isfinite(d) and d >= 0


def test_reference_with_itself_gives_zero_diff(tiny_lm, encoded) -> None:
    eos = tiny_lm.eos_token_ids
    ref = solo_decode(tiny_lm.model, encoded[0], MAX_NEW, eos, keep_logits=True)
    again = padded_decode(tiny_lm.model, [encoded[0]], MAX_NEW, eos, tiny_lm.pad_token_id, reference=[ref])[0]
    assert again.tokens == ref.tokens
    assert again.max_abs_diff == [0.0] * len(ref)


def test_keep_logits_off_keeps_none(tiny_lm, encoded) -> None:
    trace = solo_decode(tiny_lm.model, encoded[0], 3, [])
    assert isinstance(trace, RowTrace) and trace.logits is None and len(trace) == 3


def test_top2_stats_handmade() -> None:
    logits = torch.tensor([
        [0.0, 3.0, 1.0, 2.0],   # clear winner 1, runner-up 3
        [5.0, -1.0, 5.0, 4.0],  # exact tie between 0 and 2
        [-2.0, -3.0, -1.5, -9.0],  # all negative: winner 2, runner-up 0
    ])
    tok, run, t1, t2 = top2_stats(logits)
    assert tok == [1, 0, 2]  # argmax takes the first of a tie, like generate
    assert run == [3, 2, 0]  # on the tie the runner-up is the other tied index
    assert t1 == [3.0, 5.0, -1.5]
    assert t2 == [2.0, 5.0, -2.0]
    margins = [a - b for a, b in zip(t1, t2)]
    assert margins == [1.0, 0.0, 0.5]


def test_top2_stats_bfloat16_tie() -> None:
    logits = torch.tensor([[1.0, 7.0, 7.0, 0.5]], dtype=torch.bfloat16)
    tok, run, t1, t2 = top2_stats(logits)
    assert tok[0] in (1, 2) and {tok[0], run[0]} == {1, 2}
    assert tok[0] == int(torch.argmax(logits, dim=-1))
    assert t1[0] - t2[0] == 0.0
    assert all(isinstance(x, float) for x in t1 + t2)
