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


def _direct_sdpa_ok(base, module, key) -> bool:
    """Whether HF's sdpa wrapper would, for one unmasked decode row, call
    ``F.scaled_dot_product_attention(q, k, v, scale=..., enable_gqa=groups > 1)``
    and nothing else; then the ragged loop calls it directly (less Python per row)."""
    import os

    from transformers.integrations import sdpa_attention as hf_sdpa

    if base is not hf_sdpa.sdpa_attention_forward or key.device.type not in ("cpu", "cuda"):
        return False
    if os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA", "0") == "1":
        return False
    groups = getattr(module, "num_key_value_groups", 1)
    return groups == 1 or hf_sdpa.use_gqa_in_sdpa(None, key, key)


def ragged_attention(module, query, key, value, attention_mask, **kwargs):
    state = _rows.get()
    if state is None:
        raise RuntimeError("mgaudit_ragged attention used outside a ragged_step() block")
    starts, base = state
    if query.shape[2] != 1:
        raise RuntimeError("ragged attention is for single-token decode steps")
    outs = []
    if _direct_sdpa_ok(base, module, key) and not kwargs.get("dropout") and kwargs.get("softcap") is None:
        gqa = getattr(module, "num_key_value_groups", 1) > 1
        scale = kwargs.get("scaling")
        sdpa = torch.nn.functional.scaled_dot_product_attention
        for b, s in enumerate(starts):
            o = sdpa(query[b:b + 1], key[b:b + 1, :, s:], value[b:b + 1, :, s:], attn_mask=None, dropout_p=0.0,
                     scale=scale, is_causal=False, enable_gqa=gqa)
            outs.append(o)
        return torch.cat(outs, dim=0).transpose(1, 2).contiguous(), None
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
