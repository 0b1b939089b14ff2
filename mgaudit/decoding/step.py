"""One decode step of a Hugging Face causal LM, and the rules every loop shares.

This module owns what a step feeds the model: the left-padding of a batch, the
positions, the K/V cache object, the cache keyword of the model's forward, and the
**mask rule**: a batch of one unpadded row gets no attention mask (``None``), as
``generate`` effectively runs it (transformers drops an all-ones mask, so sdpa runs
causal and unmasked); a padded batch gets ``generate``'s 0/1 mask, grown by one
column a step (:func:`grow_mask`). Every decode loop of mgaudit goes through
:func:`forward_last`.
"""

from __future__ import annotations

from typing import Sequence

import torch


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


def cache_kwarg(model) -> str:
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


def forward_last(model, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
        logits_to_keep=1,
        **{cache_kwarg(model): cache},
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


def batch_mask(mask: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    """The mask a batch's forward gets: none for one row (see the module doc), else ``mask``."""
    return mask if rows > 1 else None


def grow_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The padded batch's mask after one more decoded column."""
    if mask is None:
        return None
    return torch.cat([mask, torch.ones((mask.shape[0], 1), dtype=mask.dtype, device=mask.device)], dim=-1)


def new_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older signature
        return DynamicCache()
