"""The one decode loop of mgaudit, as a generator of steps: greedy (the argmax) by default, seeded
sampling where a rule is given (:class:`mgaudit.decoding.sampling.SampleRule`: temperature 0 is
this loop without a rule, the same code and the same bits).

Every decoder is a consumer of :func:`greedy`: stock solo decoding and scan's
batched replays (:mod:`mgaudit.decoding.stock`), the policies with their checks and
repairs (:mod:`mgaudit.decoding.policies`), and diagnose's solo/batched lockstep
(:mod:`mgaudit.diagnose.layers`). The loop owns what they must agree on: which
rows are still decoding, the EOS rule, each row's step budget, the tokens fed
(pads for finished rows), the positions, and the call that advances the model by
one step. What differs between consumers is a **strategy** passed in:

* the prefill (run before the loop: the first logits and the cache come in);
* ``advance(cache, fed, positions) -> logits``: one forward of the batch,
  generate-style with a growing padding mask (:class:`Padded`) or any other way
  (the ragged fast path of :mod:`mgaudit.decoding.policies`);
* the rule that picks each row's token (``rule``: None for the argmax);
* what the consumer does at each yielded :class:`Step`: record statistics, change
  a row's token (teacher forcing, a verifier's repair, lockstep feeding), or end a
  row without a token (``chosen[b] = None``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import torch

from . import step as _step

if TYPE_CHECKING:
    from .sampling import SampleRule

Advance = Callable[[object, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Step:
    """One decode step, as the consumer sees it before the loop feeds its tokens."""

    index: int
    logits: torch.Tensor  # [rows, vocab]: the logits this step's tokens are taken from
    token: list[int]  # the rule's token: the argmax (greedy) or the sampled token
    runner_up: list[int]
    top1: list[float]  # greedy: the top-1/top-2 logits; sampled: see mgaudit.decoding.sampling
    top2: list[float]
    active: list[bool]  # rows that take a token at this step
    chosen: list[int | None]  # the token each active row takes (the rule's unless changed); None ends the row here
    fed: torch.Tensor | None  # [rows, 1]: the tokens whose forward gave these logits (None at the first step)
    positions: torch.Tensor  # [rows, 1]: their positions
    kind: list[str | None] | None = None  # sampled: which margin is the smaller, per row

    def margin(self, b: int) -> float:
        return self.top1[b] - self.top2[b]


class Padded:
    """Advance a left-padded batch as ``generate`` does: the 0/1 mask grows by one column a step
    (no mask for one row: :func:`mgaudit.decoding.step.batch_mask`)."""

    def __init__(self, model, mask: torch.Tensor | None):
        self.model = model
        self.mask = mask

    def __call__(self, cache, fed: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.mask = _step.grow_mask(self.mask)
        return _step.forward_last(self.model, fed, _step.batch_mask(self.mask, fed.shape[0]), positions, cache)


def padded_prefill(model, prompts: Sequence[Sequence[int]], pad_id: int, cache=None):
    """``generate``'s prefill of a left-padded batch: (logits, cache, positions of the last prompt
    tokens ``[rows, 1]``, the :class:`Padded` strategy that continues it)."""
    ids, mask, positions = _step.left_pad(prompts, pad_id, model.device)
    cache = _step.new_cache(model) if cache is None else cache
    logits = _step.forward_last(model, ids, _step.batch_mask(mask, len(prompts)), positions, cache)
    return logits, cache, positions[:, -1:], Padded(model, mask)


def pick(logits: torch.Tensor, index: int, active: Sequence[bool], rule: "SampleRule | None"):
    """(token, runner-up, top1, top2, kind) per row: the argmax at temperature 0 (``rule`` None),
    else the rule's draw for step ``index``. The one place a token is chosen."""
    if rule is None:
        return (*_step.top2_stats(logits), None)
    p = rule.pick(logits, index, active)
    return p.token, p.runner_up, p.top1, p.top2, p.kind


def greedy(logits: torch.Tensor | None, cache, positions: torch.Tensor, advance: Advance, *,
           eos_ids: Sequence[int], pad_id: int, budgets: Sequence[int], stop_at_eos: bool = True,
           fed: torch.Tensor | None = None, rule: "SampleRule | None" = None) -> Iterator[Step]:
    """Decoding from the prefill's ``logits`` and ``cache``: greedy, or sampled by ``rule``.

    ``positions``: ``[rows, 1]``, the position of each row's last token already in ``cache``.
    ``budgets``: per row, the most tokens it takes. ``stop_at_eos``: a row ends after taking an EOS
    token (off for teacher forcing and lockstep replays). ``fed`` (``[rows, 1]``, with ``logits``
    None): start from these known tokens instead, as a replay does: the first step is their forward
    at ``positions + 1``. Yields one :class:`Step` per step; after the consumer returns control,
    every active row takes ``chosen[b]`` (``choose``'s token unless the consumer changed it; None
    ends the row), finished rows are fed ``pad_id``, and the batch advances by one forward, until
    every row has ended. ``rule``'s counters count this loop's steps (a replay gives it its offset).
    """
    if fed is not None:
        positions = positions + 1
        logits = advance(cache, fed, positions)
    rows = logits.shape[0]
    eos = set(int(e) for e in eos_ids)
    taken = [0] * rows
    done = [budgets[b] <= 0 for b in range(rows)]
    index = 0
    device = logits.device
    while not all(done):
        active = [not d for d in done]
        token, runner_up, top1, top2, kind = pick(logits, index, active, rule)
        step = Step(index, logits, token, runner_up, top1, top2, active,
                    [t if a else None for t, a in zip(token, active)], fed, positions, kind)
        yield step
        feed = []
        for b in range(rows):
            tok = step.chosen[b] if step.active[b] else None
            if tok is None:
                done[b] = True
                feed.append(pad_id)
                continue
            taken[b] += 1
            if (stop_at_eos and tok in eos) or taken[b] >= budgets[b]:
                done[b] = True
            feed.append(int(tok))
        if all(done):
            return
        fed = torch.tensor(feed, dtype=torch.long, device=device)[:, None]
        positions = positions + 1
        logits = advance(cache, fed, positions)
        index += 1
