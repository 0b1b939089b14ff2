"""The batch-invariant contract's prefill: prompts packed into one sequence.

Under the ``batch-invariant`` contract a prompt's prefill must not depend on the
other prompts of its batch. A left-padded batched prefill fails that (every GEMM
sees ``batch x width`` rows, attention sees padding); prefilling each prompt alone
passes it but runs every GEMM over one prompt's few rows. Here every prompt's
tokens are concatenated into one row of the model's input, with each token's own
position, and:

* every linear layer runs on that token list in fixed-size chunks of
  :data:`PREFILL_ROWS` rows, zero-padded (``lm_head``, which sees one row per
  prompt, at the decode steps' fixed row count), so a token's result does not
  depend on which tokens share its chunk;
* attention runs once per prompt, causal over that prompt's own tokens, with the
  call a solo prefill makes (``F.scaled_dot_product_attention(..., is_causal=True)``);
* the remaining ops (embedding, norms, rotary, activation, residual adds) act on
  each token on its own.

A prompt prefilled alone goes through the same code (a "pack" of one): that is
the contract's reference. Whether several prompts may share one pack is checked
by the probe on this machine (:func:`check_sharing`); where it fails they are
packed one prompt at a time, which is the reference computation by construction.

Only for models whose attention is plain sdpa without sliding windows and that
have no mixture-of-experts blocks (:func:`supported`); others prefill each
prompt with the stock kernels.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator, Sequence

import torch

from .cache_ops import cache_layers
from .kernels import OpPlan, Plan, decode_kernels, find_ops
from .ragged import attention_implementation, bucketed_attention, moe_blocks
from .step import cache_kwarg, new_cache

PACKED = "mgaudit_packed"
#: Rows per GEMM in the packed prefill (a token's chunk is padded with zero rows to this).
PREFILL_ROWS = 128
_segments: contextvars.ContextVar = contextvars.ContextVar("mgaudit_packed_segments", default=None)


def supported(model) -> bool:
    return bucketed_attention(model) is not None and not moe_blocks(model)


def packed_attention(module, query, key, value, attention_mask, **kwargs):
    bounds = _segments.get()
    if bounds is None:
        raise RuntimeError("mgaudit_packed attention used outside packed_prefill()")
    if query.shape[0] != 1 or query.shape[2] != bounds[-1]:
        raise RuntimeError(f"packed attention expects one row of {bounds[-1]} tokens, got {tuple(query.shape)}")
    gqa = getattr(module, "num_key_value_groups", 1) > 1
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        o = torch.nn.functional.scaled_dot_product_attention(
            query[:, :, a:b].contiguous(), key[:, :, a:b].contiguous(), value[:, :, a:b].contiguous(),
            attn_mask=None, dropout_p=0.0, scale=kwargs.get("scaling"), is_causal=b - a > 1, enable_gqa=gqa)
        outs.append(o)
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def prefill_plan(model, decode_rows: int):
    """Every linear layer at :data:`PREFILL_ROWS` rows, ``lm_head`` at ``decode_rows``."""
    head = model.get_output_embeddings()
    plan = Plan()
    for op in find_ops(model):
        if op.kind == "linear":
            rows = decode_rows if any(m is head for m in op.modules) else PREFILL_ROWS
            plan.ops[op.key] = OpPlan(op.key, fixed_rows=rows)
    return plan


@contextlib.contextmanager
def _packed(model, bounds: list[int]) -> Iterator[None]:
    token = _segments.set(bounds)
    try:
        with attention_implementation(model, PACKED, packed_attention):
            yield
    finally:
        _segments.reset(token)


def _one_pack(model, prompts: Sequence[Sequence[int]], plan) -> tuple[torch.Tensor, list[list[tuple[Any, Any]]]]:
    """Prefill ``prompts`` as one pack: last-token logits per prompt and per-prompt K/V per layer."""

    device = model.device
    bounds = [0]
    for p in prompts:
        bounds.append(bounds[-1] + len(p))
    ids = torch.tensor([[t for p in prompts for t in p]], dtype=torch.long, device=device)
    pos = torch.cat([torch.arange(len(p), device=device) for p in prompts])[None]
    last = torch.tensor(bounds[1:], device=device) - 1
    cache = new_cache(model)
    with _packed(model, bounds), decode_kernels(model, plan):
        out = model(input_ids=ids, position_ids=pos, use_cache=True, logits_to_keep=last,
                    **{cache_kwarg(model): cache})
    kv = [[(layer.keys[:, :, a:b], layer.values[:, :, a:b]) for layer in cache_layers(cache)]
          for a, b in zip(bounds[:-1], bounds[1:])]
    return out.logits[0], kv


@torch.inference_mode()
def packed_prefill(model, prompts: Sequence[Sequence[int]], decode_rows: int, shared: bool):
    """Prefill ``prompts`` under the batch-invariant contract.

    Returns (last-token logits ``[len(prompts), vocab]``, per prompt a list of per-layer (K, V)
    of shape ``[1, kv_heads, len(prompt), head_dim]``). ``shared``: one pack for all prompts
    (only where :func:`check_sharing` held), else one pack per prompt.
    """
    plan = prefill_plan(model, decode_rows)
    if shared:
        return _one_pack(model, prompts, plan)
    logits, kv = [], []
    for p in prompts:
        lg, one = _one_pack(model, [p], plan)
        logits.append(lg)
        kv.extend(one)
    return torch.cat(logits), kv


@torch.inference_mode()
def check_sharing(model, decode_rows: int, seed: int = 0) -> dict[str, Any] | None:
    """Whether prompts may share a pack on this machine: prompts of random tokens prefilled alone
    and packed together (in two orders), logits and every K/V column compared bit for bit."""
    if not supported(model):
        return None
    gen = torch.Generator(device="cpu").manual_seed(seed)
    vocab = model.config.vocab_size
    lengths = [3, 37, 70, 130, 17, 200]
    prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]
    alone = [packed_prefill(model, [p], decode_rows, shared=False) for p in prompts]
    compared = 0
    for order in (list(range(len(prompts))), list(reversed(range(len(prompts))))):
        logits, kv = packed_prefill(model, [prompts[i] for i in order], decode_rows, shared=True)
        for j, i in enumerate(order):
            a_logits, a_kv = alone[i]
            same = torch.equal(logits[j], a_logits[0]) and all(
                torch.equal(k, ak) and torch.equal(v, av) for (k, v), (ak, av) in zip(kv[j], a_kv[0]))
            compared += 1
            if not same:
                return {"ok": False, "prompts": len(prompts), "lengths": lengths, "compared": compared,
                        "first_failure": {"prompt_length": lengths[i], "position_in_pack": j}}
    return {"ok": True, "prompts": len(prompts), "lengths": lengths, "compared": compared,
            "rows_per_gemm": PREFILL_ROWS}
