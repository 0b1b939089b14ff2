"""Seeded sampling that does not depend on the batch: the settings, the rule the decode loop
takes its tokens from, and the margin of a sampled step.

**The draw.** Gumbel-max with counter-based noise (:mod:`mgaudit.decoding.draws`): the token of
a step is the argmax over the allowed tokens of ``y_i = logit_i + T * g_i``, where ``g_i`` is a
Gumbel variate that depends only on (the prompt's draw seed, the step, the token id). This
samples exactly from ``softmax(logit / T)`` restricted to the allowed tokens, and a prompt's
draws are the same bits alone and in any batch: only its logits can make it differ.

**The allowed tokens** (applied in this order, as ``generate`` does; all keep a prefix of the
tokens sorted by logit and keep tied tokens together):

* ``top_k``: tokens whose logit is at least the k-th largest;
* ``top_p``: within those, each token whose probability mass strictly above it (renormalised
  over the top-k tokens) is below ``p``;
* ``min_p``: tokens whose probability is at least ``min_p`` times the largest.

**The margin** of a step, in logit units (as the greedy margin, so one tau means the same for
both): a perturbation that moves every logit by at most ``d`` can change the sampled token only
where ``2d`` exceeds it. Two places can change it:

* the draw: the gap between the best and the second-best ``y`` among the allowed tokens
  (kind ``sample``);
* the mask: the sampled token leaving the allowed set, or a token outside it entering with a
  better ``y`` (kind ``mask``). Its value is a lower bound computed up to ``horizon`` logits;
  where both margins are at least the horizon the step records the horizon (kind ``horizon``).

``top1`` is the sampled token's ``y``, ``top2`` is ``top1`` minus the margin (the runner-up's
``y`` where the kind is ``sample``) and ``runner_up`` the token a flip would give (-1 where
none is known), so every consumer of greedy margins reads sampling margins unchanged.

At temperature 0 nothing of this runs: the loop takes the argmax (:func:`mgaudit.decoding.step.top2_stats`).
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence


from . import draws
from ..errors import UsageError

if TYPE_CHECKING:
    import torch

#: Mask margins are resolved up to this many logits (far above any calibrated tau seen: 0.25-0.5).
HORIZON = 1.0
#: Candidates taken per row by one batched top-k (more are taken for a row that needs them).
CANDIDATES = 64
#: Without a filter, the largest logits whose draws bound the second-best score from below.
TOP = 64
#: From this many candidates a row's are found by :func:`_largest` (topk's time grows with k on a CPU).
DEEP = 1024


@dataclass(frozen=True)
class Sampling:
    """How tokens are chosen: ``temperature`` 0 is greedy (the argmax); above 0, seeded sampling
    with the filters ``top_k`` (None: off), ``top_p`` (1: off), ``min_p`` (0: off). ``seed``: the
    run's sampling seed, from which each prompt's draw seed is derived (:meth:`draw_seed`)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float = 0.0
    seed: int = 0

    def validate(self) -> None:
        t, p, k, m = self.temperature, self.top_p, self.top_k, self.min_p
        if not (isinstance(t, (int, float)) and math.isfinite(t) and t >= 0):
            raise UsageError(f"`temperature` {t} must be a finite number >= 0", hint="0 decodes greedily")
        if not (isinstance(p, (int, float)) and 0 < p <= 1):
            raise UsageError(f"`top_p` {p} must be in (0, 1]", hint="1 keeps every token")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise UsageError(f"`top_k` {k} must be an integer >= 1", hint="leave it out to keep every token")
        if not (isinstance(m, (int, float)) and 0 <= m <= 1):
            raise UsageError(f"`min_p` {m} must be in [0, 1]", hint="0 keeps every token")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise UsageError(f"`sample_seed` {self.seed} must be an integer >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def filtered(self) -> bool:
        return self.top_k is not None or self.top_p < 1 or self.min_p > 0

    def key(self) -> dict[str, Any] | None:
        """What a run's tokens depend on (None for greedy decoding: the filters and seed do not matter)."""
        if self.greedy:
            return None
        return {"temperature": float(self.temperature), "top_p": float(self.top_p), "top_k": self.top_k,
                "min_p": float(self.min_p), "seed": int(self.seed)}

    def draw_seed(self, prompt_id: str) -> int:
        """The draw seed of the prompt ``prompt_id``."""
        return draws.draw_seed(self.seed, prompt_id)

    def describe(self) -> str:
        if self.greedy:
            return "greedy (temperature 0)"
        parts = [f"temperature {self.temperature:g}"]
        if self.top_k is not None:
            parts.append(f"top-k {self.top_k}")
        if self.top_p < 1:
            parts.append(f"top-p {self.top_p:g}")
        if self.min_p > 0:
            parts.append(f"min-p {self.min_p:g}")
        return ", ".join(parts) + f", sample seed {self.seed}"


GREEDY = Sampling()


@dataclass
class Picks:
    """What a rule took for each row of one step (see the module doc for ``top1``/``top2`` of a
    sampled step). ``kind``: None (greedy) or per row ``sample``/``mask``/``horizon``."""

    token: list[int]
    runner_up: list[int]
    top1: list[float]
    top2: list[float]
    kind: list[str | None] | None = None


class SampleRule:
    """Seeded sampling for the rows of one batch: row ``b`` draws from stream ``seeds[b]``, its step
    ``i`` with counter ``first[b] + i``."""

    def __init__(self, sampling: Sampling, seeds: Sequence[int], first: Sequence[int] | int = 0,
                 horizon: float = HORIZON):
        if sampling.greedy:
            raise ValueError("SampleRule is for temperature > 0; greedy decoding takes the argmax")
        self.s = sampling
        self.seeds = [int(x) for x in seeds]
        self.first = [int(first)] * len(self.seeds) if isinstance(first, int) else [int(x) for x in first]
        self.horizon = float(horizon)

    def row(self, b: int, first: int) -> "SampleRule":
        """The rule of row ``b`` alone, its counters starting at ``first`` (a replay)."""
        return SampleRule(self.s, [self.seeds[b]], first, self.horizon)

    def pick(self, logits: torch.Tensor, index: int, active: Sequence[bool] | None = None) -> Picks:
        """The token of every row of step ``index`` (rows not ``active`` get -1 and NaN)."""
        rows = logits.shape[0]
        live = [b for b in range(rows) if active is None or active[b]]
        out = Picks([-1] * rows, [-1] * rows, [math.nan] * rows, [math.nan] * rows, [None] * rows)
        if not live:
            return out
        lg = (logits if len(live) == rows else logits[live]).float()
        keys = [draws.row_keys(self.seeds[b], self.first[b] + index) for b in live]
        if self.s.filtered:
            results = _filtered(lg, keys, self.s, self.horizon)
        else:
            results = _unfiltered(lg, keys, self.s.temperature)
        for b, (tok, ru, y1, y2, kind) in zip(live, results):
            out.token[b], out.runner_up[b], out.top1[b], out.top2[b], out.kind[b] = tok, ru, y1, y2, kind
        return out


def sample_rule(sampling: Sampling, seeds: Sequence[int], threshold: float | None = None) -> SampleRule | None:
    """The rule for rows with these draw seeds (None for greedy decoding). ``threshold``: a gate's
    tau; mask margins are then resolved up to at least twice it."""
    if sampling.greedy:
        return None
    return SampleRule(sampling, seeds, horizon=max(HORIZON, 2 * threshold) if threshold else HORIZON)


# --------------------------------------------------------------------------- no filter: the whole vocabulary


def _unfiltered(lg: torch.Tensor, keys, temperature: float) -> list[tuple]:
    """Every token allowed: the best two ``y`` over the vocabulary. The draws of the ``TOP``
    largest logits bound the second-best ``y`` from below; a token below them reaches that bound
    only with a draw above a level, which fixes a least bucket of its top 16 bits, so one integer
    comparison over the row finds the few that can; their per-bucket upper bounds keep fewer
    still, and those are computed exactly (integer operations on the whole row: exact for any shape)."""
    import torch

    rows, vocab = lg.shape
    dev = lg.device
    h = draws.bits32(draws.keys_tensor(keys, dev), torch.arange(vocab, dtype=torch.int32, device=dev))
    low, high = draws.gumbel_bounds(dev)
    t = float(temperature)
    top_v, top_i = torch.topk(lg, min(vocab, TOP), dim=-1)
    top_h = h.gather(1, top_i).to(torch.int64) & draws.MASK32
    top_b = top_h >> 16
    if top_v.shape[1] >= 2:
        second = torch.topk(top_v + t * low[top_b], 2, dim=-1).values[:, 1]
    else:
        second = torch.full((rows,), -math.inf, device=dev)
    floor = second - (1e-3 + 1e-5 * second.abs())  # below every y that can be among the best two
    # a token outside the top has a logit at most the last of them: it needs a draw of at least this
    need = (floor - top_v[:, -1]) / t - 1e-3
    first = torch.searchsorted(high, need.float().contiguous())  # the first bucket that can reach it
    level = ((first.to(torch.int64) << 16) - (1 << 31)).clamp(max=(1 << 31) - 1).to(torch.int32)
    far = (h ^ -(1 << 31)) >= level[:, None]
    far.scatter_(1, top_i, False)  # the top's own tokens come from the top
    far_r, far_c = torch.nonzero(far, as_tuple=True)
    far_h = h[far_r, far_c].to(torch.int64) & draws.MASK32
    far_v = lg[far_r, far_c]
    keep = far_v + t * high[far_h >> 16] >= floor[far_r]
    keep_top = top_v + t * high[top_b] >= floor[:, None]
    cand = (torch.cat([torch.arange(rows, device=dev)[:, None].expand_as(top_i)[keep_top], far_r[keep]]),
            torch.cat([top_i[keep_top], far_c[keep]]), torch.cat([top_v[keep_top], far_v[keep]]),
            torch.cat([top_h[keep_top], far_h[keep]]))
    if cand[0].numel() > 32 * rows:  # flat rows: rule most out on float64 scores first
        cand = _near_best_two(*cand, t, rows)
    found: list[tuple[list, list, list]] = [([], [], []) for _ in range(rows)]  # values, ids, bits
    for r, tok, v, hh in zip(*(x.tolist() for x in cand)):
        found[r][0].append(v)
        found[r][1].append(tok)
        found[r][2].append(hh)
    out, upper = [], draws.gumbel_upper()
    for vals, toks, hs in found:
        y, w, r = _best_two(vals, toks, hs, len(vals), t, upper)
        out.append((toks[w], toks[r] if r is not None else -1, y[w], y[r] if r is not None else -math.inf, "sample"))
    return out


def _near_best_two(r, tok, v, h, t: float, rows: int):
    """The candidates whose score, computed in float64 tensors (:func:`draws.gumbel_near`: within
    :data:`draws.NEAR` of the exact draw), is within a margin of their row's second best: the
    exact best two are among them."""
    import torch

    near = v.double() + t * draws.gumbel_near(h)
    order = torch.argsort(near, descending=True, stable=True)
    order = order[torch.argsort(r[order], stable=True)]  # by row, each row's best first
    counts = torch.bincount(r, minlength=rows)
    second = near[order][(torch.cumsum(counts, 0) - counts + (counts > 1).long()).clamp(max=r.numel() - 1)]
    keep = near >= second[r] - (1e-6 + 4 * t * draws.NEAR)
    return r[keep], tok[keep], v[keep], h[keep]


# --------------------------------------------------------------------------- filters: candidates by logit


def _filtered(lg: torch.Tensor, keys, s: Sampling, horizon: float) -> list[tuple]:
    """Top-k / top-p / min-p: the allowed tokens and those that could enter within the horizon
    lie among the largest logits: a batched top-k gives them, taken again four times as deep for
    the rows that need more (selection is exact: a row's candidates do not depend on the others);
    masses come from a softmax per row (the same call for a row alone and in a batch)."""
    import torch

    rows, vocab = lg.shape
    found: list = [None] * rows
    row = [_Row(s, horizon) for r in range(rows)]
    probs = None
    if s.top_p < 1:  # elementwise division, then a softmax per row
        scaled = lg / torch.tensor(float(s.temperature), dtype=torch.float32)
        probs = [torch.softmax(scaled[r], dim=-1) for r in range(rows)]
    only_p = s.top_p < 1 and s.top_k is None and s.min_p == 0
    todo = list(range(rows))
    k = min(vocab, CANDIDATES + (s.top_k or 0))
    while todo:
        if k < DEEP or k == vocab:
            vals, idx = _canonical(*torch.topk(lg[todo] if len(todo) < rows else lg, k, dim=-1))
        else:  # deep, for a few rows: the same candidates, found faster than topk
            vals, idx = (torch.stack(x) for x in zip(*(_largest(lg[r], k) for r in todo)))
        h = draws.bits(draws.keys_tensor([keys[r] for r in todo], lg.device), idx)
        masses = (torch.stack([probs[r][i] for r, i in zip(todo, idx)]).tolist() if probs is not None
                  else [None] * len(todo))
        for r, v, i, hh, m in zip(todo, vals.tolist(), idx.tolist(), h.tolist(), masses):
            if k < vocab and only_p and math.fsum(m) < s.top_p - 1e-9:
                continue  # less than top-p's mass: these cannot decide the allowed set
            found[r] = row[r].candidates(v, i, hh, m, complete=k == vocab)
        todo = [r for r in todo if found[r] is None]
        k = min(vocab, k * 4)
    return [row[r].choose(found[r]) for r in range(rows)]


def _largest(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest of one row's logits in canonical order, as :func:`_canonical` of ``topk``
    gives them (the same values; ids the same wherever the value is above the k-th): a histogram
    finds a depth below the largest holding at least ``k`` tokens, and those few are sorted."""
    import torch

    top, low = float(logits.max()), float(logits.min())
    width = (top - low) / 512
    if math.isfinite(width) and width > 0:
        above = torch.histc(logits, bins=512, min=low, max=top).flip(0).cumsum(0)  # tokens in the top j+1 bins
        j = int(torch.searchsorted(above, torch.tensor(float(k), device=above.device)))
        within = logits >= top - (j + 2) * width  # a bin more: histc's own rounding at the edges
        if int(within.sum()) >= k:
            ids = torch.nonzero(within).flatten()  # ascending: a stable sort keeps tied values in id order
            order = torch.sort(logits[ids], descending=True, stable=True).indices[:k]
            return logits[ids[order]], ids[order]
    vals, ids = _canonical(*torch.topk(logits[None], k, dim=-1))
    return vals[0], ids[0]


def _canonical(vals: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's candidates in canonical order: logit descending, then id ascending (``topk``
    leaves tied values in any order)."""
    import torch

    by_id = torch.argsort(idx, dim=-1)
    vals, idx = vals.gather(-1, by_id), idx.gather(-1, by_id)
    order = torch.sort(vals, dim=-1, descending=True, stable=True).indices
    return vals.gather(-1, order), idx.gather(-1, order)


class _Row:
    """One row's allowed set, draw and margin (Python floats: the same for the row alone and in a batch)."""

    def __init__(self, s: Sampling, horizon: float):
        self.s, self.T, self.C = s, float(s.temperature), horizon

    def candidates(self, vals, ids, hs, masses, complete: bool):
        """From candidates in canonical order (:func:`_canonical`) with their probabilities at the
        temperature (None without top-p), those that decide the allowed set and the window; None
        where more are needed."""
        # tokens tied with the last value may lie beyond the list: only values above it are complete
        n = len(vals) if complete else bisect.bisect_left([-v for v in vals], -vals[-1])
        if n < 2 and not complete:
            return None
        cut = _Cuts(vals[:n], masses[:n] if masses is not None else None, self.s, self.C, complete)
        if not cut.decided():
            return None
        return cut, ids[:n], hs[:n]

    def choose(self, cand) -> tuple:
        cut, ids, hs = cand
        T, vals = self.T, cut.vals
        high = draws.gumbel_upper()
        y, w, r = _best_two(vals, ids, hs, cut.n_allowed, T, high)
        m_sample = y[w] - y[r] if r is not None else math.inf
        # the mask: the sampled token leaving, or a token of the window entering with a better y
        m_mask, competitor = cut.leave(w), (ids[r] if r is not None else -1)
        for j in range(cut.n_allowed, cut.end):
            # a token that cannot lower the margin, whatever it takes to enter, needs no exact draw
            if y[w] - (vals[j] + T * high[hs[j] >> 16]) >= m_mask:
                continue
            yj = vals[j] + T * draws.gumbel(hs[j])
            if y[w] - yj >= m_mask:
                continue
            m = max(cut.enter(j), y[w] - yj)
            if m < m_mask:
                m_mask, competitor = m, ids[j]
        if m_mask >= self.C and m_sample >= self.C:
            return ids[w], -1, y[w], y[w] - self.C, "horizon"
        if m_sample <= m_mask:
            return ids[w], ids[r], y[w], y[r], "sample"
        return ids[w], competitor, y[w], y[w] - m_mask, "mask"


def _best_two(vals, ids, hs, n: int, T: float, high) -> tuple[dict[int, float], int, int | None]:
    """Among the first ``n`` candidates, the best and the second-best ``(y, -id)`` (indices; the
    second None where n is 1) and their exact ``y``: a token's exact draw is computed only where
    its bucket's bound can reach the second best so far (fewest where the largest logits come first)."""
    best: list[tuple[float, int, int]] = []  # (y, -id, index), best first
    for i in range(n):
        if len(best) == 2 and vals[i] + T * high[hs[i] >> 16] < best[1][0]:
            continue  # y <= this bound < the second best: neither of the two
        key = (vals[i] + T * draws.gumbel(hs[i]), -ids[i], i)
        if len(best) < 2 or key > best[1]:
            best = sorted([*best[:1], key] if len(best) == 2 else [*best, key], reverse=True)
    return {i: y for y, _, i in best}, best[0][2], (best[1][2] if len(best) > 1 else None)


def _logit(x: float) -> float:
    if x <= 0:
        return -math.inf
    if x >= 1:
        return math.inf
    return math.log(x) - math.log1p(-x)


class _Cuts:
    """The filters on a row's sorted candidates: the allowed prefix, the window of tokens that could
    enter it within the horizon, and lower bounds (logit units) of the perturbation that makes a
    token leave or enter (a perturbation moving each logit by at most d moves a logit difference by
    at most 2d, and the log-odds of a set's probability mass by at most 2d/T)."""

    def __init__(self, vals, masses, s: Sampling, horizon: float, complete: bool):
        self.vals, self.s, self.T, self.C, self.complete = vals, s, float(s.temperature), horizon, complete
        n = len(vals)
        self.kth = s.top_k is not None and s.top_k < n
        if s.top_k is not None and s.top_k >= n and not complete:
            self.n_allowed = self.end = -1  # the k-th value lies beyond the candidates
            return
        self.neg = [-v for v in vals]  # ascending: bisect counts the candidates above a value
        # top-k: tokens at least the k-th value
        self.v_k = vals[s.top_k - 1] if self.kth else -math.inf
        self.v_k1 = vals[s.top_k] if self.kth else -math.inf
        self.n_k = bisect.bisect_right(self.neg, -self.v_k) if self.kth else n
        # top-p: masses renormalised over the top-k tokens; token i is kept while the mass strictly
        # above it (prefix[bisect_left(neg, -vals[i])], which grows down the list) is below p
        self.masses = masses
        self.n_p = self.n_k
        if masses is not None:
            total = math.fsum(masses[:self.n_k]) if s.top_k is not None else 1.0
            self.q = [m / total for m in masses[:self.n_k]]
            self.prefix = [0.0, *itertools.accumulate(self.q)]
            lo, hi = 0, self.n_k
            while lo < hi:
                mid = (lo + hi) // 2
                if self.prefix[bisect.bisect_left(self.neg, self.neg[mid])] >= s.top_p:
                    hi = mid
                else:
                    lo = mid + 1
            self.n_p = lo
            self.p_closed = self.n_p < self.n_k or (s.top_k is not None and self.n_k < n)
        # min-p: value at least max + T ln(min_p)
        self.c_min = vals[0] + self.T * math.log(s.min_p) if s.min_p > 0 else -math.inf
        self.n_m = bisect.bisect_right(self.neg, -self.c_min)
        self.n_allowed = min(self.n_k, self.n_p, self.n_m)
        self.end = self._window_end()

    def decided(self) -> bool:
        """Whether the candidates decide the allowed set and hold the whole window."""
        if self.n_allowed < 1:
            return False
        if self.complete:
            return True
        n = len(self.vals)
        if self.n_allowed >= n or self.end >= n:
            return False
        if self.masses is not None and not self.p_closed and self.n_allowed == self.n_p:
            return False
        return True

    def _mass_above(self, x: float, skip: int | None = None) -> float:
        """Renormalised mass of the top-k candidates with a value above ``x`` (token ``skip`` left
        out); where ``x`` lies below the candidates and tokens beyond them are not top-k-excluded,
        their whole mass is counted too (an upper bound)."""
        n = min(bisect.bisect_left(self.neg, -x), len(self.q))  # top-k candidates with a value above x
        out = self.prefix[n] - (self.q[skip] if skip is not None and skip < n else 0.0)
        if n == len(self.q) and not self.complete and self.s.top_k is None:
            out += max(0.0, 1.0 - self.prefix[n])
        return out

    def _topp(self, bound: float) -> float:
        """A top-p bound holds while the top-k set (its normaliser) stays: capped at the top-k cut."""
        return min(bound, self.v_k - self.v_k1) if self.kth else bound

    def _window_end(self) -> int:
        """The first excluded token past the window (enter() does not decrease down the list)."""
        lo, hi = self.n_allowed, len(self.vals)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.enter(mid) < self.C:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def leave(self, w: int) -> float:
        """Lower bound of the perturbation that makes allowed token ``w`` leave (capped at the horizon)."""
        v, C, out = self.vals[w], self.C, self.C
        if self.kth:
            out = min(out, v - self.v_k1)
        if self.masses is not None:
            s = self._mass_above(v - C, skip=w)
            out = min(out, self._topp(max(0.0, self.T * (_logit(self.s.top_p) - _logit(s)))))
        if self.s.min_p > 0:
            out = min(out, v - self.c_min)
        return max(0.0, out)

    def enter(self, j: int) -> float:
        """Lower bound of the perturbation that makes excluded token ``j`` enter every filter that
        excludes it (capped at the horizon)."""
        v, C, out = self.vals[j], self.C, 0.0
        if self.kth and j >= self.n_k:
            out = max(out, self.v_k - v)
        if self.masses is not None and self.n_p <= j < self.n_k:
            s = self._mass_above(v + C)
            out = max(out, self._topp(min(C, self.T * (_logit(s) - _logit(self.s.top_p)))))
        if self.s.min_p > 0 and j >= self.n_m:
            out = max(out, self.c_min - v)
        return min(C, out)
