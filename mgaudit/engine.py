"""Greedy decode loops that record what the argmax was taken on.

Three loops share one step function:

* :func:`solo_decode` - one prompt at batch size 1, exactly what
  ``model.generate(do_sample=False)`` computes for it alone (same inputs, same
  masks, logits of the last position only);
* :func:`padded_decode` - a left-padded batch, as ``generate`` runs a batch of
  prompts of different lengths; either free-running (each row feeds its own
  argmax) or teacher-forced on given tokens (``forced``: the synchronous
  comparison, where both sides see the same prefix).

Every step records, per row, the argmax token, the runner-up token, the top-1
and top-2 logits (the margin is their difference) and, against a reference run,
the largest absolute logit difference over the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch


@dataclass
class RowTrace:
    """What one row produced, step by step."""

    tokens: list[int] = field(default_factory=list)
    runner_up: list[int] = field(default_factory=list)
    top1: list[float] = field(default_factory=list)
    top2: list[float] = field(default_factory=list)
    max_abs_diff: list[float | None] = field(default_factory=list)
    logits: list[torch.Tensor] | None = None  # kept only when asked (reference runs)

    @property
    def margins(self) -> list[float]:
        return [a - b for a, b in zip(self.top1, self.top2)]

    def __len__(self) -> int:
        return len(self.tokens)


def top2_stats(logits: torch.Tensor) -> tuple[list[int], list[int], list[float], list[float]]:
    """Argmax (the token greedy decoding takes), runner-up, top-1 and top-2 logits per row.

    The token is ``argmax`` like ``generate``; on an exact tie the runner-up is the
    other tied token and the margin is 0.
    """
    token = torch.argmax(logits, dim=-1)
    top = torch.topk(logits, 2, dim=-1)
    runner = torch.where(top.indices[:, 0] == token, top.indices[:, 1], top.indices[:, 0])
    top1 = top.values[:, 0].float()
    top2 = top.values[:, 1].float()
    return token.tolist(), runner.tolist(), top1.tolist(), top2.tolist()


def _cache_kwarg(model) -> str:
    """The name the model's forward takes its K/V cache under: ``cache`` from transformers 5.24
    (``past_key_values`` still works there, with a deprecation warning), ``past_key_values`` before."""
    cls = type(model)
    name = _CACHE_KWARG.get(cls)
    if name is None:
        import inspect

        params = inspect.signature(cls.forward).parameters
        name = _CACHE_KWARG[cls] = "cache" if "cache" in params else "past_key_values"
    return name


_CACHE_KWARG: dict[type, str] = {}


def _forward_last(model, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
        logits_to_keep=1,
        **{_cache_kwarg(model): cache},
    )
    return out.logits[:, -1, :]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids, attention mask and position ids of a left-padded batch, as ``generate`` builds them
    (positions count the row's real tokens; pads get 1)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[b, width - len(p):] = 1
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    return ids.to(device), mask.to(device), positions.to(device)


def new_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older signature
        return DynamicCache()


@torch.inference_mode()
def solo_decode(
    model,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    eos_ids: Sequence[int],
    keep_logits: bool = False,
) -> RowTrace:
    """Greedy-decode one prompt alone; stop after an EOS token or ``max_new_tokens``."""
    return padded_decode(model, [prompt_ids], max_new_tokens, eos_ids, pad_id=0, keep_logits=keep_logits)[0]


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
) -> list[RowTrace]:
    """Decode a left-padded batch the way ``generate`` does.

    ``forced``: per row, the tokens to feed (teacher forcing); the row is recorded
    for ``len(forced[b])`` steps. Without it each row feeds its own argmax and
    stops after EOS. ``reference``: per row, a trace with kept logits; each step
    records max |logit - reference logit| while the row's prefix equals the
    reference's.
    """
    device = model.device
    bsz = len(prompts)
    ids, mask, position_ids = left_pad(prompts, pad_id, device)
    eos = set(int(e) for e in eos_ids)
    if forced is not None:
        steps_for = [len(f) for f in forced]
    else:
        steps_for = [max_new_tokens] * bsz
    n_steps = max(steps_for) if steps_for else 0
    rows = [RowTrace(logits=[] if keep_logits else None) for _ in range(bsz)]
    if n_steps == 0:
        return rows
    done = [False] * bsz
    prefix_ok = [True] * bsz

    # Prefill.
    cache = new_cache(model)
    # A single unpadded row needs no mask: generate's all-ones mask is dropped by
    # transformers' mask code (sdpa then runs causal/unmasked) - same numerics, less work.
    use_mask = bsz > 1
    logits = _forward_last(model, ids, mask if use_mask else None, position_ids, cache)
    next_pos = position_ids[:, -1:] + 1
    for step in range(n_steps):
        tok, run, t1, t2 = top2_stats(logits)
        diffs: list[float | None] = [None] * bsz
        if reference is not None:
            ref_rows = [b for b in range(bsz) if not done[b] and prefix_ok[b] and step < len(reference[b])]
            if ref_rows:
                ref = torch.stack([reference[b].logits[step] for b in ref_rows]).to(device)
                d = (logits[ref_rows].float() - ref.float()).abs().amax(dim=-1).tolist()
                for b, v in zip(ref_rows, d):
                    diffs[b] = v
        feed = []
        for b in range(bsz):
            if not done[b] and step < steps_for[b]:
                r = rows[b]
                r.tokens.append(tok[b])
                r.runner_up.append(run[b])
                r.top1.append(t1[b])
                r.top2.append(t2[b])
                r.max_abs_diff.append(diffs[b])
                if keep_logits:
                    r.logits.append(logits[b].detach().clone().cpu())
                chosen = forced[b][step] if forced is not None else tok[b]
                if reference is not None and prefix_ok[b]:
                    ref_tok = reference[b].tokens[step] if step < len(reference[b]) else None
                    prefix_ok[b] = chosen == ref_tok
                if forced is None and chosen in eos:
                    done[b] = True
                if step + 1 >= steps_for[b]:
                    done[b] = True
                feed.append(chosen)
            else:
                done[b] = True
                feed.append(pad_id)
        if on_step is not None:
            on_step(step)
        if all(done):
            break
        inp = torch.tensor(feed, dtype=torch.long, device=device)[:, None]
        if use_mask:
            mask = torch.cat([mask, torch.ones((bsz, 1), dtype=mask.dtype, device=device)], dim=-1)
        logits = _forward_last(model, inp, mask if use_mask else None, next_pos, cache)
        next_pos = next_pos + 1
    return rows
