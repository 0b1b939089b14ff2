"""Ragged attention: each row of a batched decode step attends over its own,
unpadded K/V, exactly as it would alone.

The batch shares one left-padded cache (row ``b`` is valid from ``starts[b]``).
During a ragged step the model runs with the attention implementation
``mgaudit_ragged``: the projections, norms and MLP stay batched GEMMs, and the
attention of each row calls the model's own attention function (sdpa, eager,
...) on that row's valid slice with no mask, which is what the solo run computes.
No padding mask ever enters the computation, so no row is perturbed by the
others' padding. The switch is a context manager that restores the model's
implementation in ``finally``.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Sequence

import torch

RAGGED = "mgaudit_ragged"
_rows: contextvars.ContextVar = contextvars.ContextVar("mgaudit_ragged_rows", default=None)


def _attention_fn(name: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name == "eager":
        from transformers.models.llama.modeling_llama import eager_attention_forward

        return ALL_ATTENTION_FUNCTIONS.get(name, eager_attention_forward) if name in ALL_ATTENTION_FUNCTIONS else eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[name]


def ragged_attention(module, query, key, value, attention_mask, **kwargs):
    state = _rows.get()
    if state is None:
        raise RuntimeError("mgaudit_ragged attention used outside a ragged_step() block")
    starts, base = state
    if query.shape[2] != 1:
        raise RuntimeError("ragged attention is for single-token decode steps")
    outs = []
    for b, s in enumerate(starts):
        k = key[b:b + 1, :, s:, :].contiguous()
        v = value[b:b + 1, :, s:, :].contiguous()
        o, _ = base(module, query[b:b + 1], k, v, None, **kwargs)
        outs.append(o)
    return torch.cat(outs, dim=0), None


def _register() -> None:
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(RAGGED, ragged_attention)


@contextlib.contextmanager
def ragged_step(model, starts: Sequence[int]) -> Iterator[None]:
    """Run the model's forward passes in this block with ragged attention."""
    _register()
    config = model.config
    base_name = config._attn_implementation
    if base_name == RAGGED:
        raise RuntimeError("nested ragged_step")
    token = _rows.set((list(starts), _attention_fn(base_name)))
    config._attn_implementation = RAGGED
    try:
        yield
    finally:
        config._attn_implementation = base_name
        _rows.reset(token)
