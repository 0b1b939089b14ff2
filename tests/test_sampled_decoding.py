"""Seeded sampling through the decode loop and the policies, on the tiny random model (CPU).

The contract under sampling: identical to the same prompt sampled alone by mgaudit's sampler
with the same draw seed. Stock ``generate(do_sample=True)`` cannot be that reference: its draws
come from one generator shared by the batch (shown here where the logits are bit-identical).
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from perturb import after_batched_forward, flip_logits_at, rowwise_linear
from mgaudit.decoding.policies import DecodePolicy, decode, reference_decode
from mgaudit.decoding.sampling import SampleRule, Sampling
from mgaudit.decoding.stock import padded_decode, solo_decode
from mgaudit.prompts import encode_prompt, load_prompts

N = 8
MAX_NEW = 12
CONFIGS = {
    "t0.7-p0.9": Sampling(0.7, top_p=0.9, seed=1),
    "t1.0": Sampling(1.0, seed=2),
    "t0.7-k20": Sampling(0.7, top_k=20, seed=3),
    "t0.9-minp": Sampling(0.9, min_p=0.05, top_p=0.95, seed=4),
}
EXACT = {"always": DecodePolicy("always"), "gate": DecodePolicy("gate", 0.5), "invariant": DecodePolicy("invariant")}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_lm):
    from conftest import TINY_PROMPTS

    path = tmp_path_factory.mktemp("sampled") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"tiny-{i:02d}", "prompt": t}) + "\n"
                            for i, t in enumerate(TINY_PROMPTS)))
    prompts = load_prompts(str(path), limit=N).prompts
    ids = [encode_prompt(tiny_lm.tokenizer, p) for p in prompts]
    return SimpleNamespace(lm=tiny_lm, model=tiny_lm.model, ids=ids, pids=[p.id for p in prompts],
                           eos=tiny_lm.eos_token_ids, pad=tiny_lm.pad_token_id)


def _refs(s, sampling: Sampling):
    seeds = [sampling.draw_seed(p) for p in s.pids]
    return seeds, [reference_decode(s.model, p, MAX_NEW, s.eos, sampling=sampling, seed=d) for p, d in zip(s.ids, seeds)]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("key", EXACT)
@pytest.mark.parametrize("batch_size", [3, 8])
def test_exact_policies_reproduce_the_prompt_sampled_alone(setup, config, key, batch_size) -> None:
    sampling = CONFIGS[config]
    seeds, refs = _refs(setup, sampling)
    pol = EXACT[key]
    out = decode(setup.model, setup.ids, DecodePolicy(pol.name, pol.threshold), batch_size, MAX_NEW, setup.eos,
                 setup.pad, sampling=sampling, seeds=seeds)
    assert [x.tokens for x in out.sequences] == [r.tokens for r in refs]
    assert out.sampling["seeds"] == seeds
    assert all(k in ("sample", "mask", "horizon") for x in out.sequences for k in x.kind)


def test_sampling_changes_tokens_and_temperature_zero_is_greedy(setup) -> None:
    greedy = decode(setup.model, setup.ids, DecodePolicy("none"), 4, MAX_NEW, setup.eos, setup.pad)
    zero = decode(setup.model, setup.ids, DecodePolicy("none"), 4, MAX_NEW, setup.eos, setup.pad,
                  sampling=Sampling(0.0, top_p=0.5, top_k=3, seed=9))
    for a, b in zip(greedy.sequences, zero.sequences):
        assert (a.tokens, a.top1, a.top2, a.runner_up, b.kind) == (b.tokens, b.top1, b.top2, b.runner_up, None)
    sampled = decode(setup.model, setup.ids, DecodePolicy("none"), 4, MAX_NEW, setup.eos, setup.pad,
                     sampling=Sampling(1.0, seed=9))
    assert [x.tokens for x in sampled.sequences] != [x.tokens for x in greedy.sequences]
    other = decode(setup.model, setup.ids, DecodePolicy("none"), 4, MAX_NEW, setup.eos, setup.pad,
                   sampling=Sampling(1.0, seed=10))
    assert [x.tokens for x in other.sequences] != [x.tokens for x in sampled.sequences]


@pytest.mark.parametrize("policy, repaired", [(DecodePolicy("gate", 1.0), True), (DecodePolicy("always"), True),
                                              (DecodePolicy("invariant"), False)], ids=["gate", "always", "invariant"])
def test_a_flip_at_a_low_sampling_margin_is_verified_and_repaired(setup, monkeypatch, policy, repaired) -> None:
    sampling = Sampling(1.0, seed=5)
    seeds, refs = _refs(setup, sampling)
    state = flip_logits_at(monkeypatch, 2, rule=SampleRule(sampling, seeds[:4]), step=3)
    out = decode(setup.model, setup.ids, policy, 4, MAX_NEW, setup.eos, setup.pad, sampling=sampling, seeds=seeds)
    assert state["flipped"] is not None and state["flipped"][0] == refs[0].tokens[3]
    r = out.sequences[0]
    if repaired:
        assert r.verified[3] and r.repaired[3]
        assert [x.tokens for x in out.sequences] == [x.tokens for x in refs]
    else:
        assert r.tokens[:3] == refs[0].tokens[:3] and r.tokens[3] == state["flipped"][1]
        assert r.margins[3] == pytest.approx(0.01, abs=2e-3)


def test_gate_verifies_exactly_the_low_sampling_margin_steps(setup) -> None:
    sampling = Sampling(0.8, top_p=0.9, seed=6)
    seeds, _ = _refs(setup, sampling)
    tau = 0.6
    out = decode(setup.model, setup.ids, DecodePolicy("gate", tau, audit_every=10 ** 6), 4, MAX_NEW, setup.eos,
                 setup.pad, sampling=sampling, seeds=seeds)
    low = 0
    for r in out.sequences:
        for t, m in enumerate(r.margins):
            last = t == len(r.tokens) - 1
            if t > 0 and not last:
                assert r.verified[t] == (m < tau), (t, m)
                low += m < tau
    assert low > 0


def test_gate_repairs_drift_under_sampling(setup, monkeypatch) -> None:
    sampling = Sampling(0.8, top_k=20, seed=7)
    seeds, refs = _refs(setup, sampling)

    def touch(cache):
        for layer in cache.layers:
            layer.keys[0, :, -1] += 0.5

    after_batched_forward(monkeypatch, touch)
    out = decode(setup.model, setup.ids, DecodePolicy("gate", 0.0, audit_every=3), 4, MAX_NEW, setup.eos,
                 setup.pad, sampling=sampling, seeds=seeds)
    assert out.drift_events
    assert [x.tokens for x in out.sequences] == [x.tokens for x in refs]


def test_forced_sampled_decode_records_what_each_prompt_samples_alone_on_the_forced_history(setup) -> None:
    sampling = Sampling(1.0, seed=8)
    seeds, refs = _refs(setup, sampling)
    forced = [refs[(i + 1) % N].tokens for i in range(N)]
    alone = [padded_decode(setup.model, [p], MAX_NEW, setup.eos, setup.pad, forced=[f],
                           rule=SampleRule(sampling, [d]))[0] for p, f, d in zip(setup.ids, forced, seeds)]
    out = decode(setup.model, setup.ids, DecodePolicy("gate", 0.5), 4, MAX_NEW, setup.eos, setup.pad,
                 forced=forced, sampling=sampling, seeds=seeds)
    assert [x.tokens for x in out.sequences] == [a.tokens for a in alone]


# --------------------------------------------------------------------------- stock generate cannot be the reference


def test_stock_generate_samples_differently_in_a_batch_where_the_logits_are_bit_identical(setup, monkeypatch):
    """``generate(do_sample=True)`` with ``torch.manual_seed``: one prompt alone and at row 1 of a batch
    of three copies of it. Every linear layer runs row by row (perturb.rowwise_linear) and the rows
    are unpadded, so the batch's logits for that row are the solo logits bit for bit, yet the tokens
    differ: the batch draws every row's sample from one generator. mgaudit's sampler, on the same
    batch, gives the solo tokens."""
    rowwise_linear(monkeypatch)
    model, prompt = setup.model, setup.ids[4]
    ids = torch.tensor([prompt])
    kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW,
              output_logits=True, return_dict_in_generate=True, pad_token_id=setup.pad)
    torch.manual_seed(0)
    alone = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    torch.manual_seed(0)
    batch_ids = ids.repeat(3, 1)
    batched = model.generate(batch_ids, attention_mask=torch.ones_like(batch_ids), **kw)
    solo_tok = alone.sequences[0, len(prompt):].tolist()
    row_tok = batched.sequences[1, len(prompt):].tolist()
    first = next(t for t in range(MAX_NEW) if solo_tok[t] != row_tok[t])  # they differ (StopIteration fails)
    for t in range(first + 1):  # up to and including the step where they part, the logits are the same bits
        assert torch.equal(alone.logits[t][0], batched.logits[t][1]), t
    # mgaudit's sampler on the same batch: the solo tokens, every step's logits the same bits
    sampling = Sampling(1.0, seed=0)
    seed = sampling.draw_seed("p")
    solo = solo_decode(model, prompt, MAX_NEW, eos_ids=(), keep_logits=True, rule=SampleRule(sampling, [seed]))
    rows = padded_decode(model, [prompt] * 3, MAX_NEW, eos_ids=(), pad_id=setup.pad, keep_logits=True,
                         rule=SampleRule(sampling, [seed + 1, seed, seed + 2]))
    assert rows[1].tokens == solo.tokens
    assert all(torch.equal(a, b) for a, b in zip(rows[1].logits, solo.logits))
    assert not math.isnan(solo.top1[0])


@pytest.mark.parametrize("key", ["gate", "invariant"])
def test_batch_invariant_contract_under_sampling(setup, key) -> None:
    """Under ``batch-invariant`` a sampled batch equals each prompt sampled alone through the same
    kernels, bit for bit on the logits."""
    sampling = Sampling(0.8, top_p=0.9, seed=12)
    seeds = [sampling.draw_seed(p) for p in setup.pids]
    refs = [reference_decode(setup.model, p, MAX_NEW, setup.eos, contract="batch-invariant", keep_logits=True,
                             sampling=sampling, seed=d) for p, d in zip(setup.ids, seeds)]
    pol = DecodePolicy(key, 0.5 if key == "gate" else None, contract="batch-invariant")
    out = decode(setup.model, setup.ids, pol, 4, MAX_NEW, setup.eos, setup.pad, keep_logits=True, sampling=sampling,
                 seeds=seeds)
    for r, s in zip(out.sequences, refs):
        assert r.tokens == s.tokens
        assert all(torch.equal(x, y) for x, y in zip(r.logits, s.logits))
