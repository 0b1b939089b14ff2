"""Seeded sampling (mgaudit/decoding/sampling.py, draws.py): the draws, the filters, the margin's
promise, and independence from the batch, on random logits (no model)."""

from __future__ import annotations

import math

import pytest
import torch

from mgaudit.decoding import draws
from mgaudit.decoding.sampling import HORIZON, SampleRule, Sampling, _Cuts
from mgaudit.errors import UsageError

CONFIGS = [
    Sampling(0.7, top_p=0.9, seed=1),
    Sampling(1.0, top_p=0.9, seed=2),
    Sampling(0.7, top_k=50, seed=3),
    Sampling(1.0, seed=4),
    Sampling(0.8, min_p=0.05, seed=5),
    Sampling(0.8, top_k=40, top_p=0.95, min_p=0.05, seed=6),
]


def bf16_logits(rows: int, vocab: int, seed: int, scale: float = 2.5) -> torch.Tensor:
    """Logits the way a bf16 model gives them: a few large values, a dense tail, many exact ties."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=g) * scale
    x[:, :8] += torch.rand(rows, 8, generator=g) * 8  # a head of likely tokens
    return x.bfloat16().float()


# --------------------------------------------------------------------------- the draws


def test_bits_are_a_bijection_per_draw_and_depend_on_seed_and_counter() -> None:
    ids = torch.arange(1 << 16, dtype=torch.int64)
    keys = draws.keys_tensor([draws.row_keys(7, 0), draws.row_keys(7, 1), draws.row_keys(8, 0)], "cpu")
    h = draws.bits(keys, ids)
    assert int(h.min()) >= 0 and int(h.max()) < 1 << 32
    for r in range(3):
        assert len(set(h[r].tolist())) == ids.numel()  # no two tokens of one draw share their bits
    assert not torch.equal(h[0], h[1]) and not torch.equal(h[0], h[2])
    again = draws.bits(draws.keys_tensor([draws.row_keys(7, 1)], "cpu"), ids[None])
    assert torch.equal(again[0], h[1])  # a draw depends on nothing but (seed, counter, token)


def test_uniforms_are_uniform() -> None:
    ids = torch.arange(4096, dtype=torch.int64)
    keys = draws.keys_tensor([draws.row_keys(s, c) for s in range(4) for c in range(8)], "cpu")
    u = ((draws.bits(keys, ids).double() + 0.5) / 2 ** 32).flatten()
    counts = torch.histc(u, bins=32, min=0, max=1)
    expected = u.numel() / 32
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 70  # 31 degrees of freedom: p < 1e-4 above 70


def test_gumbel_max_samples_the_softmax() -> None:
    logits = torch.tensor([[2.0, 1.5, 0.0, -1.0, 1.0]])
    s = Sampling(0.8, seed=11)
    n = 12000
    counts = [0] * 5
    rule = SampleRule(s, [s.draw_seed("p")])
    for i in range(n):
        counts[rule.pick(logits, i).token[0]] += 1
    p = torch.softmax(logits[0] / 0.8, -1).tolist()
    for c, q in zip(counts, p):
        assert abs(c / n - q) < 4 * math.sqrt(q * (1 - q) / n)


def test_draw_seed_derives_from_the_sample_seed_and_the_prompt_id() -> None:
    a = Sampling(0.7, seed=1)
    assert a.draw_seed("x") == a.draw_seed("x")
    assert a.draw_seed("x") != a.draw_seed("y") != Sampling(0.7, seed=2).draw_seed("y")
    assert 0 <= a.draw_seed("x") < 2 ** 31


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize("kw, param", [({"temperature": -0.1}, "temperature"), ({"temperature": math.nan}, "temperature"),
                                        ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": 0}, "top_k"),
                                        ({"min_p": -0.1}, "min_p"), ({"seed": -1}, "sample_seed")])
def test_bad_settings_name_the_parameter(kw, param) -> None:
    with pytest.raises(UsageError) as err:
        Sampling(**{"temperature": 0.7, **kw}).validate()
    assert err.value.params[0] == param


def test_greedy_settings_key_nothing() -> None:
    assert Sampling().greedy and Sampling(0.0, top_p=0.5, seed=3).key() is None
    assert Sampling(0.7, seed=3).key()["seed"] == 3


def test_int32_bits_are_the_int64_bits(monkeypatch) -> None:
    keys = draws.keys_tensor([draws.row_keys(s, c) for s in (0, 9, 2 ** 31 - 1) for c in (0, 5)], "cpu")
    ids = torch.arange(70_001)
    want = draws.bits(keys, ids)
    assert draws._int32_wraps("cpu")
    assert torch.equal(draws.bits32(keys, ids).long() & draws.MASK32, want)
    monkeypatch.setitem(draws._WRAPS, "cpu", False)  # a device whose int32 products did not wrap
    assert torch.equal(draws.bits32(keys, ids).long() & draws.MASK32, want)


def test_the_whole_vocabulary_draw_is_the_brute_force_argmax() -> None:
    """Without a filter the token and runner-up are those of y = logit + T g over every token,
    computed one by one in Python (the search only skips tokens its bounds rule out)."""
    logits = torch.cat([bf16_logits(5, 6000, seed=21), torch.randn(2, 6000).bfloat16().float() * 0.05])
    for s in (Sampling(1.0, seed=4), Sampling(0.3, seed=5), Sampling(3.0, seed=6)):
        seeds = [s.draw_seed(f"p{b}") for b in range(len(logits))]
        got = SampleRule(s, seeds).pick(logits, 2)
        h = draws.bits(draws.keys_tensor([draws.row_keys(x, 2) for x in seeds], "cpu"), torch.arange(6000))
        for b, (row, hs) in enumerate(zip(logits.tolist(), h.tolist())):
            ys = sorted(((v + s.temperature * draws.gumbel(x), -t) for t, (v, x) in enumerate(zip(row, hs))), reverse=True)
            assert (got.token[b], got.runner_up[b], got.top1[b], got.top2[b]) == (-ys[0][1], -ys[1][1], ys[0][0], ys[1][0])


def test_deep_candidates_are_topk_s(monkeypatch) -> None:
    """Rows whose allowed set and window need thousands of candidates (flat logits at T = 1: these
    decide at 1024, 4096 and 16384 candidates) pick the same through the histogram search as
    through topk."""
    from mgaudit.decoding import sampling

    g = torch.Generator().manual_seed(1)
    logits = torch.cat([(torch.randn(1, 20_000, generator=g) * x).bfloat16().float() for x in (2.5, 3.0, 4.0, 5.0)])
    for k in (1024, 4096):
        for b in range(len(logits)):
            want = sampling._canonical(*torch.topk(logits[b:b + 1], k, dim=-1))
            got = sampling._largest(logits[b], k)
            assert torch.equal(got[0], want[0][0])
            above = want[0][0] > want[0][0, -1]  # ids of values tied at the k-th may be any of the tie
            assert torch.equal(got[1][above], want[1][0][above])
    s = Sampling(1.0, top_p=0.9, seed=3)
    seeds = [s.draw_seed(f"p{b}") for b in range(len(logits))]
    fast = SampleRule(s, seeds).pick(logits, 1)
    monkeypatch.setattr(sampling, "DEEP", 10 ** 9)
    slow = SampleRule(s, seeds).pick(logits, 1)
    assert (fast.token, fast.runner_up, fast.top1, fast.top2, fast.kind) == (
        slow.token, slow.runner_up, slow.top1, slow.top2, slow.kind)


# --------------------------------------------------------------------------- the filters


def _allowed_brute(row: torch.Tensor, s: Sampling) -> set[int]:
    """The allowed set from the definitions, in float64, over the whole row."""
    v = row.double()
    keep = torch.ones_like(v, dtype=torch.bool)
    if s.top_k is not None:
        keep &= v >= torch.sort(v, descending=True).values[s.top_k - 1]
    if s.top_p < 1:
        p = torch.softmax(v / s.temperature, -1) * keep
        p = p / p.sum()
        above = torch.tensor([float(p[v > x].sum()) for x in v.tolist()], dtype=torch.float64)
        keep &= above < s.top_p
    if s.min_p > 0:
        keep &= (v - v.max()) / s.temperature >= math.log(s.min_p)
    return set(torch.nonzero(keep).flatten().tolist())


@pytest.mark.parametrize("s", [c for c in CONFIGS if c.filtered], ids=lambda s: s.describe())
def test_sampled_token_is_allowed_and_every_allowed_token_can_win(s: Sampling) -> None:
    logits = bf16_logits(1, 300, seed=3)
    allowed = _allowed_brute(logits[0], s)
    rule = SampleRule(s, [1])
    seen = {rule.pick(logits, i).token[0] for i in range(3000)}
    assert seen <= allowed
    small = {t for t in allowed if torch.softmax(logits[0] / s.temperature, -1)[t] > 0.01}
    assert small <= seen


def test_top_k_keeps_ties_at_the_cut() -> None:
    vals = [5.0, 4.0, 3.0, 3.0, 3.0, 1.0]
    cut = _Cuts(vals, None, Sampling(1.0, top_k=3), HORIZON, complete=True)
    assert cut.n_allowed == 5
    assert cut.leave(2) == 0.0  # a tied token at the cut leaves for any perturbation


# --------------------------------------------------------------------------- the batch does not matter


@pytest.mark.parametrize("s", CONFIGS, ids=lambda s: s.describe())
def test_a_row_samples_the_same_alone_and_in_any_batch(s: Sampling) -> None:
    logits = bf16_logits(7, 1000, seed=5)
    seeds = [s.draw_seed(f"p{b}") for b in range(7)]
    batch = SampleRule(s, seeds).pick(logits, 3)
    for b in range(7):
        alone = SampleRule(s, [seeds[b]]).pick(logits[b:b + 1], 3)
        got = (batch.token[b], batch.runner_up[b], batch.top1[b], batch.top2[b], batch.kind[b])
        assert got == (alone.token[0], alone.runner_up[0], alone.top1[0], alone.top2[0], alone.kind[0])
    # and in another order, with other companions
    order = [6, 2, 0]
    again = SampleRule(s, [seeds[b] for b in order]).pick(logits[order], 3)
    assert again.token == [batch.token[b] for b in order]


# --------------------------------------------------------------------------- the margin's promise


@pytest.mark.parametrize("s", CONFIGS, ids=lambda s: s.describe())
def test_a_perturbation_changes_the_token_only_where_twice_it_exceeds_the_margin(s: Sampling) -> None:
    """Move every logit by at most d: wherever the sampled token changes, the unperturbed step's
    margin is below 2d (the same promise as the greedy margin, on which tau is fitted)."""
    g = torch.Generator().manual_seed(17)
    changed = 0
    for trial in range(150):
        logits = bf16_logits(4, 400, seed=100 + trial, scale=1.5)
        d = [0.02, 0.06, 0.2, 0.6][trial % 4]
        noise = (torch.rand(logits.shape, generator=g) * 2 - 1) * d
        rule = SampleRule(s, [trial, trial + 1, trial + 2, trial + 3])
        a = rule.pick(logits, trial)
        b = rule.pick(logits + noise, trial)
        for r in range(4):
            margin = a.top1[r] - a.top2[r]
            assert margin >= 0
            if a.token[r] != b.token[r]:
                changed += 1
                assert margin < 2 * d, (trial, r, margin, d, a.kind[r])
    assert changed > 0  # the perturbations did change tokens: the assertion above was exercised
