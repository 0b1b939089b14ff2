"""The one greedy decode loop of mgaudit, as a generator of steps.

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
* what the consumer does at each yielded :class:`Step`: record statistics, change
  a row's token (teacher forcing, a verifier's repair, lockstep feeding), or end a
  row without a token (``chosen[b] = None``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from . import step as _step

Advance = Callable[[object, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Step:
    """One decode step, as the consumer sees it before the loop feeds its tokens."""

    index: int
    logits: torch.Tensor  # [rows, vocab]: the logits this step's tokens are taken from
    argmax: list[int]
    runner_up: list[int]
    top1: list[float]
    top2: list[float]
    active: list[bool]  # rows that take a token at this step
    chosen: list[int | None]  # the token each active row takes (argmax unless changed); None ends the row here
    fed: torch.Tensor | None  # [rows, 1]: the tokens whose forward gave these logits (None at the first step)
    positions: torch.Tensor  # [rows, 1]: their positions

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


def argmax_choice(step: Step) -> list[int | None]:
    """The token each active row takes unless the consumer changes it: its argmax (temperature 0).
    The one place the loop chooses a token (``greedy(choose=...)`` takes another rule)."""
    return [t if a else None for t, a in zip(step.argmax, step.active)]


def greedy(logits: torch.Tensor | None, cache, positions: torch.Tensor, advance: Advance, *,
           eos_ids: Sequence[int], pad_id: int, budgets: Sequence[int], stop_at_eos: bool = True,
           fed: torch.Tensor | None = None, choose: Callable[[Step], list] = argmax_choice) -> Iterator[Step]:
    """Greedy decoding from the prefill's ``logits`` and ``cache``.

    ``positions``: ``[rows, 1]``, the position of each row's last token already in ``cache``.
    ``budgets``: per row, the most tokens it takes. ``stop_at_eos``: a row ends after taking an EOS
    token (off for teacher forcing and lockstep replays). ``fed`` (``[rows, 1]``, with ``logits``
    None): start from these known tokens instead, as a replay does: the first step is their forward
    at ``positions + 1``. Yields one :class:`Step` per step; after the consumer returns control,
    every active row takes ``chosen[b]`` (``choose``'s token unless the consumer changed it; None
    ends the row), finished rows are fed ``pad_id``, and the batch advances by one forward, until
    every row has ended.
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
        argmax, runner_up, top1, top2 = _step.top2_stats(logits)
        active = [not d for d in done]
        step = Step(index, logits, argmax, runner_up, top1, top2, active, [], fed, positions)
        step.chosen = choose(step)
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
