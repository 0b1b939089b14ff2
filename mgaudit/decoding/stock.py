"""Stock decoding, recording what each token was taken on (consumers of the one loop,
:func:`mgaudit.decoding.loop.greedy`; greedy, or seeded sampling with a ``rule``):

* :func:`solo_decode` - one prompt at batch size 1, exactly what
  ``model.generate(do_sample=False)`` computes for it alone (same inputs, same
  masks, logits of the last position only);
* :func:`padded_decode` - a left-padded batch, as ``generate`` runs a batch of
  prompts of different lengths; either free-running (each row feeds its own
  token) or teacher-forced on given tokens (``forced``: the synchronous
  comparison, where both sides see the same prefix).

Every step records, per row, the token the rule took (the argmax, or the sampled token), the
runner-up token, the top-1 and top-2 scores (the margin is their difference; see
:mod:`mgaudit.decoding.sampling` for a sampled step) and, against a reference run, the largest
absolute logit difference over the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from .loop import greedy, padded_prefill

if TYPE_CHECKING:
    from .sampling import SampleRule


@dataclass
class RowTrace:
    """What one row produced, step by step."""

    tokens: list[int] = field(default_factory=list)
    runner_up: list[int] = field(default_factory=list)
    top1: list[float] = field(default_factory=list)
    top2: list[float] = field(default_factory=list)
    max_abs_diff: list[float | None] = field(default_factory=list)
    logits: list[torch.Tensor] | None = None  # kept only when asked (reference runs)
    kind: list[str | None] | None = None  # sampled: which margin is the smaller, per step

    @property
    def margins(self) -> list[float]:
        return [a - b for a, b in zip(self.top1, self.top2)]

    def __len__(self) -> int:
        return len(self.tokens)


@torch.inference_mode()
def solo_decode(
    model,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    eos_ids: Sequence[int],
    keep_logits: bool = False,
    rule: "SampleRule | None" = None,
) -> RowTrace:
    """Decode one prompt alone (greedy, or sampled by a one-row ``rule``); stop after an EOS token
    or ``max_new_tokens``."""
    return padded_decode(model, [prompt_ids], max_new_tokens, eos_ids, pad_id=0, keep_logits=keep_logits,
                         rule=rule)[0]


@torch.inference_mode()
def padded_decode(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_ids: Sequence[int],
    pad_id: int,
    forced: Sequence[Sequence[int]] | None = None,
    reference: Sequence[RowTrace] | None = None,
    keep_logits: bool = False,
    on_step: Callable[[int], None] | None = None,
    rule: "SampleRule | None" = None,
) -> list[RowTrace]:
    """Decode a left-padded batch the way ``generate`` does.

    ``forced``: per row, the tokens to feed (teacher forcing); the row is recorded
    for ``len(forced[b])`` steps. Without it each row feeds its own token and
    stops after EOS. ``rule``: seeded sampling (None: greedy). ``reference``: per row, a trace
    with kept logits; each step records max |logit - reference logit| while the row's prefix equals the
    reference's.
    """
    bsz = len(prompts)
    budgets = [len(f) for f in forced] if forced is not None else [max_new_tokens] * bsz
    rows = [RowTrace(logits=[] if keep_logits else None, kind=[] if rule is not None else None)
            for _ in range(bsz)]
    if not budgets or max(budgets) == 0:
        return rows
    prefix_ok = [True] * bsz
    logits, cache, positions, advance = padded_prefill(model, prompts, pad_id)
    for st in greedy(logits, cache, positions, advance, eos_ids=eos_ids, pad_id=pad_id, budgets=budgets,
                     stop_at_eos=forced is None, rule=rule):
        diffs: list[float | None] = [None] * bsz
        if reference is not None:
            ref_rows = [b for b in range(bsz) if st.active[b] and prefix_ok[b] and st.index < len(reference[b])]
            if ref_rows:
                ref = torch.stack([reference[b].logits[st.index] for b in ref_rows]).to(st.logits.device)
                d = (st.logits[ref_rows].float() - ref.float()).abs().amax(dim=-1).tolist()
                for b, v in zip(ref_rows, d):
                    diffs[b] = v
        for b in range(bsz):
            if not st.active[b]:
                continue
            r = rows[b]
            r.tokens.append(st.token[b])
            r.runner_up.append(st.runner_up[b])
            r.top1.append(st.top1[b])
            r.top2.append(st.top2[b])
            r.max_abs_diff.append(diffs[b])
            if r.kind is not None:
                r.kind.append(st.kind[b])
            if keep_logits:
                r.logits.append(st.logits[b].detach().clone().cpu())
            if forced is not None:
                st.chosen[b] = forced[b][st.index]
            if reference is not None and prefix_ok[b]:
                ref_tok = reference[b].tokens[st.index] if st.index < len(reference[b]) else None
                prefix_ok[b] = st.chosen[b] == ref_tok
        if on_step is not None:
            on_step(st.index)
    return rows
