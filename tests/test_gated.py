"""Batched decoding under a policy (mgaudit.decoding.policies) on the tiny random model (CPU).

Exactness: every policy but ``none`` must reproduce the solo (batch size 1)
tokens. Repairs: a perturbation injected into the batched fast path only (a
flipped logit, a corrupted K/V column) is undone by the verifier and shows in
the output of the policy without one.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from perturb import after_batched_forward, flip_logits_at
import mgaudit.decoding.kernels as kernels
import mgaudit.decoding.ragged as ragged
from mgaudit.decoding.stock import solo_decode
from mgaudit.errors import UsageError
from mgaudit.decoding.policies import DecodePolicy, decode
from mgaudit.decoding.invariance import probe
from mgaudit.decoding.kernels import decode_kernels, plan_for
from mgaudit.prompts import encode_prompt, load_prompts
from mgaudit.decoding.ragged import RAGGED, ragged_step

N = 8
MAX_NEW = 12
BATCH_SIZES = [2, 4, 8]

#: The policies that must be exact, with an id for each.
EXACT = {
    "always": DecodePolicy("always"),
    "gate-0.5": DecodePolicy("gate", 0.5),
    "gate-inf": DecodePolicy("gate", math.inf),
    "invariant": DecodePolicy("invariant"),
}


def _policy(key: str) -> DecodePolicy:
    p = EXACT[key]
    return DecodePolicy(p.name, p.threshold, p.fast_path, p.max_rows, p.contract)  # a fresh copy per test


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_lm):
    """8 prompts of different lengths (encoded) and their solo references."""
    from conftest import TINY_PROMPTS

    path = tmp_path_factory.mktemp("gated") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"tiny-{i:02d}", "prompt": t}) + "\n"
                            for i, t in enumerate(TINY_PROMPTS)))
    ids = [encode_prompt(tiny_lm.tokenizer, p) for p in load_prompts(str(path), limit=N).prompts]
    assert len(ids) == N and len({len(p) for p in ids}) > 4  # really ragged
    eos, pad = tiny_lm.eos_token_ids, tiny_lm.pad_token_id
    solos = [solo_decode(tiny_lm.model, p, MAX_NEW, eos) for p in ids]
    return SimpleNamespace(lm=tiny_lm, model=tiny_lm.model, ids=ids, eos=eos, pad=pad, solos=solos,
                           solo_tokens=[s.tokens for s in solos])


def _decode(s, policy: DecodePolicy, batch_size: int, max_new: int = MAX_NEW, eos=None, ids=None):
    return decode(s.model, ids if ids is not None else s.ids, policy, batch_size, max_new,
                  s.eos if eos is None else eos, s.pad)


def _check_record_shapes(out, n: int = N) -> None:
    assert len(out.sequences) == n
    for r in out.sequences:
        assert len(r.tokens) == len(r.margins) == len(r.verified) == len(r.repaired) >= 1
        assert len(r.audited) == len(r.tokens)
        assert r.triggers + r.audits == sum(r.verified) and r.repairs == sum(r.repaired)
        assert r.repairs <= sum(r.verified)
        # a repair only where that step was verified; step 0 (the prefill) never is
        assert all(v for v, rep in zip(r.verified, r.repaired) if rep)
        assert r.verified[0] is False
        assert all(m >= 0 for m in r.margins)


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("batch_size", BATCH_SIZES)
@pytest.mark.parametrize("key", list(EXACT))
def test_policy_reproduces_solo(setup, key, batch_size) -> None:
    out = _decode(setup, _policy(key), batch_size)
    _check_record_shapes(out)
    got = [r.tokens for r in out.sequences]
    for i, (g, s) in enumerate(zip(got, setup.solo_tokens)):
        assert g == s, (key, batch_size, i, g, s)


@pytest.mark.parametrize("batch_size", BATCH_SIZES)
def test_policy_none_runs(setup, batch_size) -> None:
    out = _decode(setup, DecodePolicy("none"), batch_size)
    _check_record_shapes(out)
    assert out.max_rows is None  # no ragged path, nothing probed
    for r in out.sequences:
        assert len(r.tokens) == MAX_NEW and r.triggers == 0 and r.repairs == 0


@pytest.mark.parametrize("max_rows", [1, 3])
def test_ragged_path_with_chunked_gemms(setup, max_rows) -> None:
    """max_rows below the batch size: every linear layer runs in chunks of at most max_rows rows,
    in a layout the probe found row-invariant that far (so the output stays exact on any CPU)."""
    out = _decode(setup, DecodePolicy("invariant", max_rows=max_rows), 8)
    assert out.max_rows == max_rows
    linear = [k for k in out.plan if k.startswith("linear")]
    assert linear and all("chunks of" in out.plan[k] for k in linear)
    assert [r.tokens for r in out.sequences] == setup.solo_tokens


def test_max_rows_is_probed_on_the_ragged_path_only(setup) -> None:
    out = _decode(setup, DecodePolicy("invariant"), 4)
    # the smallest product the probe's plan runs: its chunk where the probe limited an op, else the batch
    plan = plan_for(probe(setup.model, 4), 4, model=setup.model)
    assert out.max_rows == min([p.chunk or 4 for p in plan.ops.values()] or [4])
    assert _decode(setup, DecodePolicy("always"), 4).max_rows is None
    assert _decode(setup, DecodePolicy("gate", 0.5, fast_path="padded"), 4).max_rows is None


@pytest.mark.parametrize("key", list(EXACT))
def test_rows_that_stop_early_at_eos(setup, key) -> None:
    """An EOS token that ends some rows mid-batch while the others go on."""
    solos = setup.solo_tokens
    eos = None
    for seq in solos:
        for t in seq[2:7]:
            if 0 < sum(t in s for s in solos) < len(solos):
                eos = t
                break
        if eos is not None:
            break
    assert eos is not None, "no token ends only some of the sequences"
    ref = [solo_decode(setup.model, p, MAX_NEW, [eos]).tokens for p in setup.ids]
    lengths = [len(r) for r in ref]
    assert min(lengths) < MAX_NEW and max(lengths) == MAX_NEW
    for bs in (4, 8):
        out = _decode(setup, _policy(key), bs, eos=[eos])
        assert [r.tokens for r in out.sequences] == ref, (key, bs)
        for r in out.sequences:
            assert eos not in r.tokens[:-1]


def test_last_batch_smaller_than_batch_size(setup) -> None:
    ids = setup.ids[:5]
    for key in EXACT:
        out = _decode(setup, _policy(key), 4, ids=ids)  # batches of 4 and 1
        assert [r.tokens for r in out.sequences] == setup.solo_tokens[:5], key


def test_on_batch_callback(setup) -> None:
    seen: list[int] = []
    decode(setup.model, setup.ids[:7], DecodePolicy("invariant"), 3, 2, setup.eos, setup.pad, on_batch=seen.append)
    assert seen == [3, 3, 1]


# --------------------------------------------------------------------------- counts


@pytest.mark.parametrize("batch_size", [2, 8])
def test_always_verifies_every_step_after_the_first(setup, batch_size) -> None:
    for policy in (DecodePolicy("always"), DecodePolicy("gate", math.inf)):
        out = _decode(setup, policy, batch_size)
        for r in out.sequences:
            assert len(r.tokens) >= 1
            assert r.triggers == len(r.tokens) - 1, policy.name
            assert r.verified == [False] + [True] * (len(r.tokens) - 1)
            assert r.repairs == 0  # nothing to repair on an exact fast path


def test_gate_threshold_zero_triggers_nothing(setup) -> None:
    """tau = 0: no margin triggers. The ragged gate still audits (the last step of every row,
    and every ``audit_every`` steps); the paper's padded gate checks nothing."""
    out = _decode(setup, DecodePolicy("gate", 0.0, fast_path="padded"), 4)
    assert all(r.triggers == 0 and r.repairs == 0 for r in out.sequences)
    assert not any(any(r.verified) for r in out.sequences)
    out = _decode(setup, DecodePolicy("gate", 0.0, audit_every=5), 4)
    for r in out.sequences:
        assert r.triggers == 0 and r.repairs == 0 and not r.drift
        assert r.audited[-1], "the step that ends a row is always checked"
        checked = [i for i, a in enumerate(r.audited) if a]
        gaps = [b - a for a, b in zip([0] + checked, checked)]
        assert max(gaps) <= 5, gaps
    assert out.audit_every == 5


def test_invariant_never_verifies(setup) -> None:
    out = _decode(setup, DecodePolicy("invariant"), 4)
    assert all(not any(r.verified) and not any(r.repaired) for r in out.sequences)


def test_gate_verifies_exactly_the_low_margin_steps(setup) -> None:
    tau = 0.5
    out = _decode(setup, DecodePolicy("gate", tau), 4)
    total = 0
    for r in out.sequences:
        by_margin = [v and not a for v, a in zip(r.verified, r.audited)]
        assert by_margin == [i > 0 and m < tau for i, m in enumerate(r.margins)]
        total += r.triggers
    assert total > 0  # the tiny model has small margins: tau = 0.5 does trigger
    assert total < sum(len(r.tokens) - 1 for r in out.sequences)


# --------------------------------------------------------------------------- repairs


#: The 3rd batched decode forward produces the logits of step 3 (step 0 comes from the prefill).
FLIP_CALL, FLIP_STEP = 2, 3


@pytest.mark.parametrize("fast_path", ["ragged", "padded"])
def test_gate_repairs_a_flipped_logit(setup, monkeypatch, fast_path) -> None:
    state = flip_logits_at(monkeypatch, FLIP_CALL)
    out = _decode(setup, DecodePolicy("gate", 1.0, fast_path=fast_path), 4)
    assert state["flipped"] is not None
    solo_tok, runner = state["flipped"]
    assert solo_tok == setup.solo_tokens[0][FLIP_STEP]
    r = out.sequences[0]
    assert r.margins[FLIP_STEP] == pytest.approx(0.01, abs=1e-3)
    assert r.verified[FLIP_STEP] and r.repaired[FLIP_STEP]
    assert [x.tokens for x in out.sequences] == setup.solo_tokens


def test_always_repairs_a_flipped_logit(setup, monkeypatch) -> None:
    state = flip_logits_at(monkeypatch, FLIP_CALL)
    out = _decode(setup, DecodePolicy("always"), 4)
    assert state["flipped"] is not None
    assert out.sequences[0].repaired[FLIP_STEP] and out.sequences[0].repairs == 1
    assert [x.tokens for x in out.sequences] == setup.solo_tokens


@pytest.mark.parametrize("policy", [DecodePolicy("invariant"), DecodePolicy("none"), DecodePolicy("gate", 0.0)],
                         ids=["invariant", "none", "gate-0"])
def test_without_a_verifier_the_flip_shows(setup, monkeypatch, policy) -> None:
    state = flip_logits_at(monkeypatch, FLIP_CALL)
    out = _decode(setup, policy, 4)
    solo_tok, runner = state["flipped"]
    r = out.sequences[0]
    assert r.tokens != setup.solo_tokens[0]
    assert r.tokens[:FLIP_STEP] == setup.solo_tokens[0][:FLIP_STEP]
    assert r.tokens[FLIP_STEP] == runner != solo_tok
    assert r.repairs == 0


def _corrupt_kv(monkeypatch, noise: float = 1.0) -> dict:
    """After every batched decode forward, add ``noise`` to row 0's new K column, every layer."""

    def touch(cache):
        for layer in cache.layers:
            layer.keys[0, :, -1] += noise

    return after_batched_forward(monkeypatch, touch)


@pytest.mark.parametrize("batch_size", [2, 4, 8])
def test_verifier_replaces_a_corrupted_kv_column(setup, monkeypatch, batch_size) -> None:
    state = _corrupt_kv(monkeypatch)
    out = _decode(setup, DecodePolicy("always"), batch_size)
    assert state["calls"] > 0
    assert [x.tokens for x in out.sequences] == setup.solo_tokens


@pytest.mark.parametrize("batch_size", [2, 4, 8])
def test_without_a_verifier_the_corrupted_kv_shows(setup, monkeypatch, batch_size) -> None:
    state = _corrupt_kv(monkeypatch)
    out = _decode(setup, DecodePolicy("invariant"), batch_size)
    assert state["calls"] > 0
    assert out.sequences[0].tokens != setup.solo_tokens[0]
    # rows other than 0 of each batch are untouched by the noise (rows attend only to themselves)
    for i in range(N):
        if i % batch_size:
            assert out.sequences[i].tokens == setup.solo_tokens[i], i


# --------------------------------------------------------------------------- trace fields and teacher forcing


def _forced_reference(s, forced):
    """What each prompt alone chooses at each step when fed ``forced`` (stock, batch size 1)."""
    from mgaudit.decoding.stock import padded_decode

    return [padded_decode(s.model, [p], MAX_NEW, s.eos, s.pad, forced=[f])[0] for p, f in zip(s.ids, forced)]


def _others(s) -> list[list[int]]:
    """For prompt i, the solo continuation of prompt i+1: tokens that are not its own choices."""
    return [s.solo_tokens[(i + 1) % N] for i in range(N)]


def test_policy_records_the_fast_paths_top2_like_a_stock_run(setup) -> None:
    out = _decode(setup, DecodePolicy("invariant"), 4)
    for r, solo in zip(out.sequences, setup.solos):
        assert r.top1 == solo.top1 and r.top2 == solo.top2 and r.runner_up == solo.runner_up
        assert r.margins == [a - b for a, b in zip(r.top1, r.top2)]
    padded = _decode(setup, DecodePolicy("none"), 4)  # the padded fast path: what scan's padded replay records
    from mgaudit.decoding.stock import padded_decode

    stock = padded_decode(setup.model, setup.ids[:4], MAX_NEW, setup.eos, setup.pad)
    for r, t in zip(padded.sequences[:4], stock):
        assert (r.tokens, r.top1, r.top2, r.runner_up) == (t.tokens, t.top1, t.top2, t.runner_up)


@pytest.mark.parametrize("key", list(EXACT))
def test_forced_decode_records_what_the_policy_chooses_on_the_forced_history(setup, key) -> None:
    forced = _others(setup)
    ref = _forced_reference(setup, forced)
    out = decode(setup.model, setup.ids, _policy(key), 4, MAX_NEW, setup.eos, setup.pad, forced=forced)
    for i, (r, t, f) in enumerate(zip(out.sequences, ref, forced)):
        assert len(r.tokens) == len(f) == len(t.tokens), i
        assert r.tokens == t.tokens, (key, i)  # the choices given the forced prefix, not the fed tokens
    assert any(r.tokens != f for r, f in zip(out.sequences, forced))


def test_forced_decode_feeds_past_eos_and_takes_the_forced_budget(setup) -> None:
    forced = [f[:3 + i % 4] for i, f in enumerate(_others(setup))]
    eos = [forced[0][1]]  # an EOS in the middle of a forced row does not end it
    out = decode(setup.model, setup.ids, DecodePolicy("gate", 0.5), 8, MAX_NEW, eos, setup.pad, forced=forced)
    assert [len(r.tokens) for r in out.sequences] == [len(f) for f in forced]
    with pytest.raises(UsageError, match="`forced`"):
        decode(setup.model, setup.ids, DecodePolicy("invariant"), 4, MAX_NEW, setup.eos, setup.pad, forced=forced[:2])


def test_forced_gate_repairs_a_flipped_logit(setup, monkeypatch) -> None:
    forced = _others(setup)
    ref = _forced_reference(setup, forced)
    state = flip_logits_at(monkeypatch, FLIP_CALL)
    out = decode(setup.model, setup.ids, DecodePolicy("gate", 1.0), 4, MAX_NEW, setup.eos, setup.pad, forced=forced)
    assert state["flipped"] is not None
    r = out.sequences[0]
    assert r.verified[FLIP_STEP] and r.repaired[FLIP_STEP]
    assert [x.tokens for x in out.sequences] == [t.tokens for t in ref]


def test_forced_gate_replays_drift_on_the_forced_tokens(setup, monkeypatch) -> None:
    forced = _others(setup)
    ref = _forced_reference(setup, forced)
    _corrupt_kv(monkeypatch, noise=0.5)
    out = decode(setup.model, setup.ids, DecodePolicy("gate", 0.0, audit_every=3), 4, MAX_NEW, setup.eos,
                 setup.pad, forced=forced)
    assert out.drift_events and any(e.replayed_steps > 1 for e in out.drift_events)
    assert [x.tokens for x in out.sequences] == [t.tokens for t in ref]
    unverified = decode(setup.model, setup.ids, DecodePolicy("invariant"), 4, MAX_NEW, setup.eos, setup.pad,
                        forced=forced)
    assert unverified.sequences[0].top1 != ref[0].top1  # the corruption does reach the fast path


# --------------------------------------------------------------------------- helpers


def _linears(model) -> list[torch.nn.Linear]:
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)]


def _assert_linears_restored(model) -> None:
    for lin in _linears(model):
        assert "forward" not in vars(lin)
        assert lin.forward.__func__ is torch.nn.Linear.forward


def _chunked_linears(model, rows: int):
    """Every linear layer in chunks of at most ``rows`` rows (the plan ``max_rows`` makes)."""
    return decode_kernels(model, plan_for(None, rows + 1, max_rows=rows, model=model))


def test_decode_kernels_restore_forward(tiny_lm) -> None:
    model = tiny_lm.model
    lins = _linears(model)
    assert lins
    _assert_linears_restored(model)
    with _chunked_linears(model, 2):
        assert all("forward" in vars(lin) for lin in lins)
    _assert_linears_restored(model)
    with pytest.raises(ValueError, match="boom"):
        with _chunked_linears(model, 2):
            assert all("forward" in vars(lin) for lin in lins)
            raise ValueError("boom")
    _assert_linears_restored(model)


def test_chunked_linears_split_into_chunks(tiny_lm, monkeypatch) -> None:
    lin = _linears(tiny_lm.model)[0]
    rows_seen: list[int] = []
    real = torch.nn.functional

    def spy(x, w, b=None):
        rows_seen.append(x.reshape(-1, x.shape[-1]).shape[0])
        return real.linear(x, w, b)

    monkeypatch.setattr(kernels, "F", SimpleNamespace(linear=spy))
    x = torch.randn(5, 1, lin.in_features, generator=torch.Generator().manual_seed(0)).to(lin.weight.dtype)
    with torch.inference_mode():
        with _chunked_linears(tiny_lm.model, 2):
            y = lin(x)
    assert rows_seen == [2, 2, 1]
    assert y.shape == (5, 1, lin.out_features)
    rows_seen.clear()
    with torch.inference_mode(), _chunked_linears(tiny_lm.model, 8):
        lin(x)
    assert rows_seen == [5]  # within the limit: one GEMM


def test_chunked_linears_equal_the_chunks_run_one_by_one(tiny_lm) -> None:
    """Chunks of 2 rows give, row for row, what the same 2-row products give outside the mode (the
    same GEMM shapes, so on any CPU), and the model's own forward is back afterwards."""
    model = tiny_lm.model
    gen = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        with _chunked_linears(model, 2):
            outs = {}
            for lin in _linears(model):
                x = torch.randn(5, lin.in_features, generator=gen).to(lin.weight.dtype)
                outs[lin] = (x, lin(x))
        _assert_linears_restored(model)
        for lin, (x, y) in outs.items():
            by_hand = torch.cat([lin(x[0:2]), lin(x[2:4]), lin(x[4:5])])
            assert torch.equal(y, by_hand), lin


def test_ragged_step_restores_attention_implementation(tiny_lm) -> None:
    config = tiny_lm.model.config
    before = config._attn_implementation
    assert before != RAGGED
    with ragged_step(tiny_lm.model, [0, 1]):
        assert config._attn_implementation == RAGGED
        assert ragged._rows.get() is not None
    assert config._attn_implementation == before and ragged._rows.get() is None
    with pytest.raises(KeyError):
        with ragged_step(tiny_lm.model, [0, 1]):
            raise KeyError("inside")
    assert config._attn_implementation == before and ragged._rows.get() is None


def test_ragged_step_refuses_nesting_and_still_restores(tiny_lm) -> None:
    config = tiny_lm.model.config
    before = config._attn_implementation
    with pytest.raises(RuntimeError, match="nested"):
        with ragged_step(tiny_lm.model, [0]):
            with ragged_step(tiny_lm.model, [0]):
                pass
    assert config._attn_implementation == before and ragged._rows.get() is None


def test_ragged_attention_outside_a_block_raises() -> None:
    with pytest.raises(RuntimeError, match="outside"):
        ragged.ragged_attention(None, torch.zeros(1, 1, 1, 1), None, None, None)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "policy, needle",
    [
        (DecodePolicy("bogus"), "`policy` 'bogus'"),
        (DecodePolicy("gate"), "`threshold`"),
        (DecodePolicy("gate", -1.0), "`threshold` -1.0"),
        (DecodePolicy("gate", math.nan), "`threshold` nan"),
        (DecodePolicy("gate", 0.5, fast_path="sideways"), "`fast_path` 'sideways'"),
        (DecodePolicy("invariant", fast_path="sideways"), "`fast_path` 'sideways'"),
        (DecodePolicy("invariant", max_rows=0), "`max_rows` 0"),
        (DecodePolicy("gate", 0.5, max_rows=-3), "`max_rows` -3"),
        (DecodePolicy("invariant", contract="sloppy"), "`contract` 'sloppy'"),
        (DecodePolicy("always", contract="batch-invariant"), "batch-invariant"),
        (DecodePolicy("gate", 0.5, audit_every=0), "`audit_every` 0"),
        (DecodePolicy("gate", audit_every=0), "`audit_every` 0"),  # a bad value before a missing one
    ],
    ids=["unknown", "gate-no-threshold", "negative-threshold", "nan-threshold", "bad-fast-path",
         "bad-fast-path-invariant", "max-rows-0", "max-rows-negative", "bad-contract", "always-bi",
         "audit-0", "audit-0-before-missing-threshold"],
)
def test_policy_validate_errors(policy, needle) -> None:
    with pytest.raises(UsageError) as exc:
        policy.validate()
    assert needle in exc.value.one_line()
    assert "\n" not in exc.value.one_line()


@pytest.mark.parametrize("policy, ragged, solo_prefill, audits", [
    (DecodePolicy("none"), False, False, False), (DecodePolicy("always"), False, True, False),
    (DecodePolicy("invariant"), True, True, False), (DecodePolicy("gate", 0.0), True, True, True),
    (DecodePolicy("gate", math.inf), True, True, True),
    (DecodePolicy("gate", 0.5, fast_path="padded", max_rows=1), False, False, False)],
    ids=["none", "always", "invariant", "gate-0", "gate-inf", "gate-padded"])
def test_policy_validate_accepts(policy, ragged, solo_prefill, audits) -> None:
    policy.validate()  # raises on bad input (test_policy_validate_errors); here: what the policy runs
    assert (policy.ragged, policy.solo_prefill, policy.audits) == (ragged, solo_prefill, audits)


def test_decode_refuses_bad_input(setup) -> None:
    with pytest.raises(UsageError, match="`batch_size` 0"):
        _decode(setup, DecodePolicy("invariant"), 0)
    with pytest.raises(UsageError, match="threshold"):
        _decode(setup, DecodePolicy("gate"), 4)


def test_policy_properties() -> None:
    assert not DecodePolicy("none").solo_prefill and not DecodePolicy("none").ragged
    assert DecodePolicy("always").solo_prefill and not DecodePolicy("always").ragged
    assert DecodePolicy("invariant").solo_prefill and DecodePolicy("invariant").ragged
    assert DecodePolicy("gate", 1.0).solo_prefill and DecodePolicy("gate", 1.0).ragged
    padded = DecodePolicy("gate", 1.0, fast_path="padded")
    assert not padded.solo_prefill and not padded.ragged
    assert DecodePolicy("always").verifies(1e9)
    assert DecodePolicy("gate", 1.0).verifies(0.5) and not DecodePolicy("gate", 1.0).verifies(1.0)
    assert not DecodePolicy("invariant").verifies(0.0) and not DecodePolicy("none").verifies(0.0)
