"""The probe's power, per-op plans, drift audits with rollback, and the batch-invariant contract
(tiny random model, CPU). Perturbations stand in for kernels that are not row-invariant, so these
tests hold on any CPU: they never assert what one machine's kernels do."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from mgaudit.decoding.stock import solo_decode
from mgaudit.decoding.policies import DecodePolicy, decode, reference_decode
from mgaudit.decoding.invariance import LayoutResult, OpResult, ProbeReport, probe
from mgaudit.decoding.kernels import decode_kernels, find_ops, plan_for
from mgaudit.prompts import encode_prompt, load_prompts
from perturb import after_batched_forward, rowwise_linear

N, MAX_NEW = 8, 14
_LINEAR = torch.nn.functional.linear  # the real kernel, kept before any test patches it


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_lm):
    from conftest import TINY_PROMPTS

    path = tmp_path_factory.mktemp("drift") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"t{i}", "prompt": t}) + "\n" for i, t in enumerate(TINY_PROMPTS)))
    ids = [encode_prompt(tiny_lm.tokenizer, p) for p in load_prompts(str(path), limit=N).prompts]
    eos, pad = tiny_lm.eos_token_ids, tiny_lm.pad_token_id
    solos = [solo_decode(tiny_lm.model, p, MAX_NEW, eos, keep_logits=True) for p in ids]
    return SimpleNamespace(model=tiny_lm.model, ids=ids, eos=eos, pad=pad, solos=solos)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MGAUDIT_CACHE", str(tmp_path / "cache"))


def _assert_exact(out, solos) -> None:
    for i, (r, s) in enumerate(zip(out.sequences, solos)):
        assert r.tokens == s.tokens, i
        assert r.logits is not None and len(r.logits) == len(s.logits)
        for step, (a, b) in enumerate(zip(r.logits, s.logits)):
            assert torch.equal(a.float(), b.float()), (i, step)


def _bf16_ulp_linear(shape, rate, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def linear(x, w, b=None):
        y = _LINEAR(x, w, b)
        rows = x.reshape(-1, x.shape[-1]).shape[0]
        if tuple(w.shape) != shape or rows < 2:
            return y
        flat = y.reshape(rows, -1).contiguous().clone()
        if rate is None:
            hit = torch.zeros(flat.shape, dtype=torch.bool)
            hit[0, 0] = True
        else:
            hit = torch.rand(flat.shape, generator=gen) < rate
        bits = flat.view(torch.int16)
        bits[hit.to(flat.device)] += 1  # the next bf16 value away from zero: one ulp
        return flat.reshape(y.shape)

    return linear


def _target(model) -> tuple[str, tuple[int, int]]:
    op = next(o for o in find_ops(model) if o.kind == "linear" and o.modules[0].weight.shape[0] != o.modules[0].weight.shape[1])
    return op.key, tuple(op.modules[0].weight.shape)


# --------------------------------------------------------------------------- the probe


def test_probe_sizes_its_draws_for_one_in_ten_thousand(setup) -> None:
    rep = probe(setup.model, 4, use_cache=False)
    assert rep.min_elements >= 46050  # (1 - 1e-4) ** n < 0.01
    for o in rep.ops:
        for r in o.layouts:
            # every row count tried (2..4, or up to the first failure) compared min_elements elements
            tried = (r.first_failure or 4) - 1
            assert r.elements >= tried * rep.min_elements, (o.key, r.layout)
            assert r.limit == (r.first_failure - 1 if r.first_failure else 4)
    kinds = {o.kind for o in rep.ops}
    assert {"linear", "norm", "act", "rotary", "embedding", "add"} <= kinds
    assert any(o.key.startswith("linear") and o.modules == 1 for o in rep.ops)  # lm_head is probed too


def test_probe_limits_a_shape_perturbed_in_one_of_ten_thousand_outputs(setup, monkeypatch) -> None:
    key, shape = _target(setup.model)
    monkeypatch.setattr(torch.nn.functional, "linear", _bf16_ulp_linear(shape, 1e-4))
    rep = probe(setup.model, 8, use_cache=False)
    op = rep.op(key)
    for layout in op.layouts:  # both layouts go through the perturbed F.linear
        assert layout.limit == 1 and layout.first_failure == 2, layout
    assert plan_for(rep, 8).ops[key].chunk == 1
    others = [o for o in rep.ops if o.key != key and o.kind == "linear"]
    assert others and all(o.limit() >= 1 for o in others)


def test_probe_is_cached_per_machine_and_threads(setup) -> None:
    a = probe(setup.model, 4)
    b = probe(setup.model, 4)
    assert not a.cached and b.cached
    assert b.summary()["ops"] == a.summary()["ops"]
    assert b.fingerprint["threads"] == torch.get_num_threads()
    machine = b.fingerprint["machine"]
    assert machine.get("isa") or machine.get("gpu")  # the kernels' family is part of the key
    assert probe(setup.model, 2).cached  # a smaller batch is covered by a larger probe
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(old + 1)
        assert not probe(setup.model, 4).cached
    finally:
        torch.set_num_threads(old)


def test_probe_cache_is_not_reused_under_no_probe_cache(setup, monkeypatch) -> None:
    assert not probe(setup.model, 4).cached
    assert probe(setup.model, 4).cached
    monkeypatch.setenv("MGAUDIT_NO_PROBE_CACHE", "1")
    fresh = probe(setup.model, 4)
    assert not fresh.cached and fresh.summary()["ops"] == probe(setup.model, 4).summary()["ops"]


def test_sharing_checks_run_when_the_batch_invariant_contract_is_first_asked_for(setup, monkeypatch) -> None:
    import mgaudit.decoding.packed as packed

    calls = []
    real = packed.check_sharing
    monkeypatch.setattr(packed, "check_sharing", lambda *a, **k: calls.append(1) or real(*a, **k))
    solo = probe(setup.model, 4)
    assert not solo.sharing_checked and solo.attention is None and solo.prefill is None and not calls
    bi = probe(setup.model, 4, contract="batch-invariant")  # added to the cached report
    assert bi.cached and bi.sharing_checked and bi.attention is not None and bi.prefill is not None
    again = probe(setup.model, 4, contract="batch-invariant")
    assert again.cached and again.sharing_checked and again.prefill == bi.prefill and len(calls) == 1
    assert again.summary()["ops"] == solo.summary()["ops"]


def _report(limits: dict[str, dict[str, int]]) -> ProbeReport:
    ops = [OpResult(k, "linear", 1, [LayoutResult(l, v) for l, v in d.items()]) for k, d in limits.items()]
    return ProbeReport(16, ops, {}, 0.0)


def test_plan_picks_the_cheapest_exact_way_per_op() -> None:
    rep = _report({"linear a": {"batched": 16, "colmajor": 16},
                   "linear b": {"batched": 1, "colmajor": 16},
                   "linear c": {"batched": 3, "colmajor": 5}})
    plan = plan_for(rep, 16)
    assert plan.ops["linear a"].layout == "batched" and plan.ops["linear a"].chunk is None
    assert plan.ops["linear b"].layout == "colmajor" and plan.ops["linear b"].chunk is None
    assert plan.ops["linear c"].layout == "colmajor" and plan.ops["linear c"].chunk == 5
    assert set(plan.describe()) == {"linear b", "linear c"}
    forced = plan_for(rep, 16, max_rows=4)
    assert forced.ops["linear a"].chunk == 4 and forced.ops["linear b"].layout == "colmajor"
    assert forced.ops["linear c"].layout == "colmajor"
    bi = plan_for(rep, 16, contract="batch-invariant")
    assert all(p.fixed_rows == 16 for p in bi.ops.values())


def test_decode_kernels_restores_every_module(setup) -> None:
    model = setup.model
    rep = _report({o.key: {"batched": 1, "colmajor": 1} for o in find_ops(model) if o.kind == "linear"})
    plan = plan_for(rep, 8)
    mods = [m for o in find_ops(model) for m in o.modules if o.kind == "linear"]
    with pytest.raises(KeyError):
        with decode_kernels(model, plan):
            assert all("forward" in vars(m) for m in mods)
            raise KeyError("x")
    assert all("forward" not in vars(m) for m in mods)


# --------------------------------------------------------------------------- drift audits


def _nudge_kv(monkeypatch) -> dict:
    """After every batched fast-path forward, move one element of row 0's new K column by one
    bf16 ulp in every layer: a persistent perturbation the K/V cache keeps."""

    def touch(cache):
        for layer in cache.layers:
            layer.keys[0, 0, -1].view(torch.int16)[0] += 1

    return after_batched_forward(monkeypatch, touch)


@pytest.mark.parametrize("batch_size", [4, 8])
def test_gate_detects_persistent_drift_on_unverified_steps_and_stays_exact(setup, monkeypatch, batch_size) -> None:
    state = _nudge_kv(monkeypatch)
    # tau = 0: no step is verified for its margin; only audits (every 3 steps and at the end) look
    out = decode(setup.model, setup.ids, DecodePolicy("gate", 0.0, audit_every=3), batch_size, MAX_NEW,
                 setup.eos, setup.pad, keep_logits=True)
    assert state["calls"] > 0
    events = out.drift_events
    assert events, "the audits must see the perturbed K/V"
    assert all(e.what in ("kv", "logits+kv", "logits") for e in events)
    assert any(e.replayed_steps > 1 for e in events)  # rolled back past unverified steps
    assert all(r.triggers == 0 for r in out.sequences)
    _assert_exact(out, setup.solos)


def test_without_audits_the_same_drift_changes_the_logits(setup, monkeypatch) -> None:
    _nudge_kv(monkeypatch)
    out = decode(setup.model, setup.ids, DecodePolicy("invariant"), 4, MAX_NEW, setup.eos, setup.pad,
                 keep_logits=True)
    r, s = out.sequences[0], setup.solos[0]
    assert any(not torch.equal(a, b.float()) for a, b in zip(r.logits[1:], s.logits[1:]))


def test_gate_finds_the_op_that_drifted_and_lowers_it(setup, monkeypatch) -> None:
    clean = probe(setup.model, 4, use_cache=False)
    key, shape = _target(setup.model)
    for layout in clean.op(key).layouts:  # the probe saw this op invariant; then its kernel went bad
        layout.limit, layout.first_failure = 4, None
    # every M > 1 product of this shape is one ulp off, wherever it runs (model or probe)
    monkeypatch.setattr(torch.nn.functional, "linear", _bf16_ulp_linear(shape, None))
    # the solo run sees the same kernels (its prefill runs many rows too): that is the reference
    solos = [solo_decode(setup.model, p, MAX_NEW, setup.eos, keep_logits=True) for p in setup.ids]
    out = decode(setup.model, setup.ids, DecodePolicy("gate", 0.0, audit_every=2), 4, MAX_NEW, setup.eos,
                 setup.pad, keep_logits=True, probe_report=clean)
    assert out.drift_events
    assert out.drift_events[0].op == key and out.drift_events[0].rows == 4
    assert [x["op"] for x in out.lowered] and all(x["op"] == key for x in out.lowered)
    assert out.lowered[-1]["to"].endswith("chunks of 1")
    assert out.plan[key].endswith("chunks of 1")
    _assert_exact(out, solos)


# --------------------------------------------------------------------------- contracts


@pytest.mark.parametrize("batch_size", [2, 5, 8])
def test_batch_invariant_contract_matches_its_own_reference(setup, monkeypatch, batch_size) -> None:
    """The contract accepted: GEMMs whose rows do not depend on the batch (injected, so on any CPU;
    the refused branch is test_batch_invariant_contract_is_refused_...)."""
    rowwise_linear(monkeypatch)
    assert probe(setup.model, batch_size, contract="batch-invariant").summary()["fixed_rows_ok"]
    refs = [reference_decode(setup.model, p, MAX_NEW, setup.eos, contract="batch-invariant", keep_logits=True)
            for p in setup.ids]
    for policy in (DecodePolicy("invariant", contract="batch-invariant"),
                   DecodePolicy("gate", 0.5, contract="batch-invariant")):
        out = decode(setup.model, setup.ids, policy, batch_size, MAX_NEW, setup.eos, setup.pad, keep_logits=True)
        assert out.contract == "batch-invariant"
        assert all("16 rows padded" in v for k, v in out.plan.items() if k.startswith("linear"))
        _assert_exact(out, refs)
        assert not out.drift_events


def test_solo_contract_reference_is_stock_solo(setup) -> None:
    for p, s in zip(setup.ids[:3], setup.solos):
        ref = reference_decode(setup.model, p, MAX_NEW, setup.eos)
        assert ref.tokens == s.tokens


def test_batch_invariant_contract_is_refused_where_the_probe_finds_fixed_rows_variant(setup) -> None:
    from mgaudit.errors import UsageError

    rep = probe(setup.model, 4, contract="batch-invariant")
    rep.ops[1].fixed_rows_ok = False  # as if that op's 16-row product depended on the other rows
    with pytest.raises(UsageError, match="not batch-invariant on this machine") as exc:
        decode(setup.model, setup.ids, DecodePolicy("invariant", contract="batch-invariant"), 4, MAX_NEW,
               setup.eos, setup.pad, probe_report=rep)
    assert rep.ops[1].key in str(exc.value) and "\n" not in exc.value.one_line()


# --------------------------------------------------------------------------- batch-invariant attention and prefill


def _one_ulp(t: torch.Tensor) -> torch.Tensor:
    flat = t.contiguous().clone()
    flat.view(torch.int16).reshape(-1)[0] += 1
    return flat


def test_shared_attention_call_is_refused_when_a_row_differs_there(setup, monkeypatch) -> None:
    rowwise_linear(monkeypatch)  # the contract's GEMMs row-invariant on any CPU: it is accepted
    import mgaudit.decoding.ragged as ragged
    from mgaudit.decoding.ragged import check_attention_sharing

    real = ragged.bucketed_sdpa

    def shared_differs(query, key, value, mask, scale, groups):
        out = real(query, key, value, mask, scale, groups)
        return _one_ulp(out) if query.shape[0] > 1 else out  # a shared call changes its first row

    clean = probe(setup.model, 4, contract="batch-invariant")
    assert clean.summary()["fixed_rows_ok"]
    assert plan_for(clean, 4, contract="batch-invariant").attention_span == (clean.attention["span"]
                                                                            if clean.attention["ok"] else 0)
    refs = [reference_decode(setup.model, p, MAX_NEW, setup.eos, contract="batch-invariant", keep_logits=True)
            for p in setup.ids]
    monkeypatch.setattr(ragged, "bucketed_sdpa", shared_differs)
    found = check_attention_sharing(setup.model, 4, torch.Generator().manual_seed(0))
    assert found["ok"] is False and found["first_failure"]["rows"] >= 2
    clean.attention = found
    assert plan_for(clean, 4, contract="batch-invariant").attention_span == 0
    # rows then attend one call each, which the perturbation does not touch: still the reference
    out = decode(setup.model, setup.ids, DecodePolicy("invariant", contract="batch-invariant"), 4, MAX_NEW,
                 setup.eos, setup.pad, keep_logits=True, probe_report=clean)
    _assert_exact(out, refs)


def test_shared_prefill_is_refused_when_packing_changes_a_prompt(setup, monkeypatch) -> None:
    import mgaudit.decoding.packed as packed

    rowwise_linear(monkeypatch)  # the contract's GEMMs row-invariant on any CPU: it is accepted
    real = packed.packed_attention

    def packing_differs(module, query, key, value, attention_mask, **kwargs):
        out, w = real(module, query, key, value, attention_mask, **kwargs)
        return (_one_ulp(out) if len(packed._segments.get()) > 2 else out), w  # more than one prompt packed

    clean = probe(setup.model, 4, contract="batch-invariant")
    assert clean.prefill["ok"] and clean.prefill["compared"] >= 1
    refs = [reference_decode(setup.model, p, MAX_NEW, setup.eos, contract="batch-invariant", keep_logits=True)
            for p in setup.ids]
    monkeypatch.setattr(packed, "packed_attention", packing_differs)
    found = packed.check_sharing(setup.model, 16)
    assert found["ok"] is False
    clean.prefill = found
    assert plan_for(clean, 4, contract="batch-invariant").prefill_shared is False
    out = decode(setup.model, setup.ids, DecodePolicy("invariant", contract="batch-invariant"), 4, MAX_NEW,
                 setup.eos, setup.pad, keep_logits=True, probe_report=clean)
    _assert_exact(out, refs)


def test_packed_prefill_matches_each_prompt_packed_alone_where_the_probe_says_so(setup, monkeypatch) -> None:
    """Where the probe's sharing check holds (GEMMs row-invariant, injected so on any CPU; the other
    branch is test_shared_prefill_is_refused_...), a shared pack is each prompt packed alone."""
    from mgaudit.decoding.packed import packed_prefill

    rowwise_linear(monkeypatch)
    rep = probe(setup.model, 4, contract="batch-invariant")
    assert rep.sharing_checked and rep.prefill["ok"]
    prompts = setup.ids[:5]
    logits, kv = packed_prefill(setup.model, prompts, 16, shared=True)
    for j, p in enumerate(prompts):
        lg, one = packed_prefill(setup.model, [p], 16, shared=False)
        assert torch.equal(logits[j], lg[0])
        assert all(torch.equal(k, k1) and torch.equal(v, v1) for (k, v), (k1, v1) in zip(kv[j], one[0]))
        assert kv[j][0][0].shape[2] == len(p)


def test_bucketed_attention_restores_the_thread_count_on_error() -> None:
    from mgaudit.decoding.ragged import bucketed_sdpa

    before = torch.get_num_threads()
    q = torch.zeros(1, 2, 1, 4)
    with pytest.raises(RuntimeError):
        bucketed_sdpa(q, torch.zeros(1, 2, 3, 5), torch.zeros(1, 2, 3, 5), None, None, 1)  # head dims disagree
    assert torch.get_num_threads() == before
