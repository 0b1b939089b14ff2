"""Ragged attention: each row of a batched decode step attends over its own,
unpadded K/V, exactly as it would alone.

The batch shares one left-padded cache (row ``b`` is valid from column ``starts[b]``).
During a ragged step the model runs with the attention implementation
``mgaudit_ragged``: the projections, norms and MLP stay batched GEMMs, and the
attention of each row calls the model's own attention function (sdpa, or the
model's own eager function, softcapping and sinks included) on the slice of K/V
that the row would see alone, with the mask that the solo run passes. No padding
mask ever enters the computation, so no row is perturbed by the others' padding.

What a row "sees alone" (transformers 5 conventions, checked against its code):

* a full-attention layer: every column of the row, ``[starts[b], T)``;
* a sliding-window layer (window ``W``): ``kv > q - W``, i.e. the last ``W`` columns
  including the new one, ``[max(starts[b], T - W), T)``. A solo run's
  ``DynamicSlidingWindowLayer`` keeps ``W - 1`` columns and attends over those and the
  new one, so its K/V tensor is exactly this slice;
* the mask: a solo decode step's sdpa mask is skipped (``None``) except on a sliding
  layer whose visible length has reached ``W``, where transformers passes an all-true
  boolean mask (which changes sdpa's GQA path); eager gets a float mask of zeros.
  The row's mask is made by transformers' own mask function for the base
  implementation with the solo run's sizes, so both cases match bit for bit.

Mixture-of-experts blocks run one row at a time inside a ragged step (a solo decode
step routes one token, and every expert GEMM then has one row), so routing and
expert GEMMs are batch-invariant by construction.

The switch is a context manager that restores the model's implementation (and any
MoE forward it replaced) in ``finally``.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

RAGGED = "mgaudit_ragged"
_rows: contextvars.ContextVar = contextvars.ContextVar("mgaudit_ragged_rows", default=None)


@dataclass
class _State:
    starts: list[int]
    base_name: str
    base: Any  # the attention function (None for eager: resolved per module)
    windows: list[int | None]  # per layer
    config: Any
    cache: Any = None
    masks: dict = field(default_factory=dict)
    bucket: int | None = None  # batch-invariant attention: each row's K/V left-padded to a multiple of this
    share_span: int = 0  # ... and rows share one call while the padded length is at most this (0: never)


def _attention_fn(name: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name == "eager":
        return None  # the model's own eager function, looked up per attention module
    return ALL_ATTENTION_FUNCTIONS[name]


_eager_fns: dict[type, Any] = {}


def _eager_fn(module):
    """The ``eager_attention_forward`` of the module's own modeling file (Gemma's has softcapping,
    gpt-oss's sinks); Llama's for a module whose file has none."""
    cls = type(module)
    fn = _eager_fns.get(cls)
    if fn is None:
        fn = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
        if fn is None:
            from transformers.models.llama.modeling_llama import eager_attention_forward as fn
        _eager_fns[cls] = fn
    return fn


_windows_cache: "weakref.WeakKeyDictionary[Any, list]" = weakref.WeakKeyDictionary()


def layer_windows(model) -> list[int | None]:
    """Per decoder layer: its sliding window (None for full attention), read from the cache
    layers transformers builds for the model (what a solo run uses)."""
    found = _windows_cache.get(model)
    if found is None:
        from .cache_ops import cache_layers, layer_window
        from .step import new_cache

        found = [layer_window(layer) for layer in cache_layers(new_cache(model))]
        _windows_cache[model] = found
    return found


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


def _solo_mask(state: _State, length: int, window: int | None, dtype, device):
    """The mask a solo decode step passes to the attention of a layer whose visible K/V has
    ``length`` columns: transformers' own mask function for the base implementation."""
    key = (length, window, dtype, str(device))
    if key in state.masks:
        return state.masks[key]
    from transformers.masking_utils import (ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function,
                                            sliding_window_causal_mask_function)

    mask = None
    if state.base_name in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        fn = ALL_MASK_ATTENTION_FUNCTIONS[state.base_name]
        mask = fn(batch_size=1, q_length=1, kv_length=length, q_offset=length - 1, kv_offset=0,
                  mask_function=sliding_window_causal_mask_function(window) if window else causal_mask_function,
                  attention_mask=None, allow_is_causal_skip=True, local_size=window, dtype=dtype,
                  config=state.config, use_vmap=False, device=device)
    state.masks[key] = mask
    return mask


def _layer_offset(state: _State, layer_idx: int | None, key_len: int) -> tuple[int, int]:
    """(T, offset): the absolute column count after this step's update, and the absolute column
    of ``key[..., 0, :]``. Without a cache, the key holds every column (pad_cache_left's cache)."""
    if state.cache is None or layer_idx is None:
        return key_len, 0
    from .cache_ops import cache_layers, layer_span

    _, end = layer_span(cache_layers(state.cache)[layer_idx])
    return end, end - key_len


def _layer_window(state: _State, layer_idx: int | None, passed: int | None) -> int | None:
    """The sliding window of the layer being run (None: full attention), from its cache layer type;
    the window the model passes to its attention function must agree."""
    windows = state.windows
    if layer_idx is not None and layer_idx < len(windows):
        window = windows[layer_idx]
    elif len(set(windows)) <= 1:
        window = windows[0] if windows else None
    else:
        raise RuntimeError("ragged attention: cannot tell which layer (and window) this attention module is")
    if passed is not None and passed != window:
        raise RuntimeError(f"ragged attention: layer {layer_idx} is called with sliding_window={passed} "
                           f"but its cache layer has window {window}")
    return window


#: Batch-invariant attention: each row's K/V is padded to a multiple of this many columns.
BUCKET = 16
#: Rows may share one attention call up to this padded length (what the probe checks).
SHARE_SPAN = 512


def bucketed_attention(model) -> int | None:
    """The bucket of the batch-invariant contract's attention for ``model`` (None: the model's
    attention is not plain sdpa without windows, and its rows attend one at a time, unpadded)."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return None
    if any(w is not None for w in layer_windows(model)):
        return None
    return BUCKET


def bucket_mask(width: int, lengths: Sequence[int], device) -> torch.Tensor:
    """``[rows, 1, 1, width]``: True on each row's last ``lengths[i]`` columns (its own, right-aligned)."""
    need = torch.tensor([width - n for n in lengths], device=device)
    return (torch.arange(width, device=device)[None, :] >= need[:, None])[:, None, None, :]


def bucketed_sdpa(query, key, value, mask, scale, groups: int):
    """The batch-invariant contract's attention call for single-token queries ``[B, H, 1, D]`` over
    left-padded K/V ``[B, H_kv, L, D]`` with a boolean ``mask [B, 1, 1, L]``.

    A model with grouped K/V heads has each group's queries packed into the query-length axis (one
    K/V read per group, as transformers does for a masked decode step). On a CPU the call runs on
    one thread: with two, sdpa's CPU kernel gave a row a different result in about 1 of 1,000
    shared calls on an AMD EPYC (none in 8,000 on one thread), and the call costs ~280 us instead
    of ~160 us for 16 rows.
    """
    bsz, heads, _, dim = query.shape
    if groups > 1:
        query = query.reshape(bsz, heads // groups, groups, dim)
    threads = torch.get_num_threads() if query.device.type == "cpu" else 1
    try:
        if threads != 1:
            torch.set_num_threads(1)
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0,
                                                               scale=scale, is_causal=False)
    finally:
        if threads != 1:
            torch.set_num_threads(threads)
    return out.reshape(bsz, heads, 1, dim)


#: Rows the attention check compares with the row alone (on an AMD EPYC, two threads made about 1
#: row in 1,000 differ: the check must see thousands to catch that).
SHARING_ROWS = 4096


@torch.inference_mode()
def check_attention_sharing(model, up_to: int, gen: torch.Generator) -> dict[str, Any] | None:
    """Whether the batch-invariant attention may run a batch's rows in one call.

    Under that contract a row attends over its K/V left-padded with zero columns to a multiple of
    :data:`BUCKET` and masked, so its result depends on its own length only. A shared call
    pads every row to the longest row's multiple: the check draws groups of 2..``up_to`` rows of
    random lengths up to :data:`SHARE_SPAN` and compares every row of the shared call with the
    row alone, bit for bit, :data:`SHARING_ROWS` rows in all. None where the contract's attention
    is per row.
    """
    if bucketed_attention(model) is None:
        return None
    cfg = model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    scale = next((m.scaling for m in model.modules() if hasattr(m, "scaling") and hasattr(m, "layer_idx")),
                 dim ** -0.5)
    p = next(model.parameters())
    dev, dtype = p.device, p.dtype
    bucket, span = BUCKET, SHARE_SPAN

    def attend(rows, w):
        k = torch.zeros((len(rows), kv_heads, w, dim), dtype=dtype, device=dev)
        v = torch.zeros_like(k)
        for i, (n, _, rk, rv) in enumerate(rows):
            k[i, :, w - n:], v[i, :, w - n:] = rk, rv
        mask = bucket_mask(w, [r[0] for r in rows], dev)
        return bucketed_sdpa(torch.stack([r[1] for r in rows]), k, v, mask, scale, heads // kv_heads)

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(dev, dtype)

    t0 = time.perf_counter()
    compared = draws = 0
    first_failure = None
    while compared < SHARING_ROWS and first_failure is None:
        g = 2 + draws % max(up_to - 1, 1)
        lengths = torch.randint(1, span + 1, (g,), generator=gen).tolist()
        w = max(-(-n // bucket) * bucket for n in lengths)
        rows = [(n, rand(heads, 1, dim, std=2.0), rand(kv_heads, n, dim, std=2.0), rand(kv_heads, n, dim))
                for n in lengths]
        got = attend(rows, w)
        draws += 1
        for i, r in enumerate(rows):
            compared += 1
            if not torch.equal(got[i], attend([r], -(-r[0] // bucket) * bucket)[0]):
                first_failure = {"rows": g, "padded_to": w, "row_length": r[0]}
                break
    return {"ok": first_failure is None, "bucket": bucket, "span": span, "draws": draws, "rows_compared": compared,
            "elements": compared * heads * dim, "first_failure": first_failure,
            "seconds": round(time.perf_counter() - t0, 2)}


def _bucketed(state: _State, query, key, value, total: int, groups: int, scale):
    """The batch-invariant contract's attention: each row attends over its own columns, left-padded
    with zero columns to a multiple of ``state.bucket`` and masked, so its result depends on the row
    alone. Rows share one call (padded to the longest row's multiple) up to ``state.share_span``
    columns where the probe found that shared call row-invariant; otherwise one call per row."""
    bucket = state.bucket
    lengths = [total - s for s in state.starts]
    padded = [-(-n // bucket) * bucket for n in lengths]
    if max(padded) > key.shape[2]:
        raise RuntimeError(f"batch-invariant attention needs {max(padded)} columns, the cache holds "
                           f"{key.shape[2]} (build it with zero columns in front: cache_ops.pad_cache_left(zero_columns=...))")
    rows = list(range(len(lengths)))
    if state.share_span and max(padded) <= state.share_span:
        return _bucketed_call(state, query, key, value, total, rows, max(padded), lengths, groups,
                              scale).contiguous(), None
    outs = [_bucketed_call(state, query[b:b + 1], key[b:b + 1], value[b:b + 1], total, [b], padded[b], lengths,
                           groups, scale) for b in rows]
    return torch.cat(outs, dim=0).contiguous(), None


def _bucketed_call(state: _State, query, key, value, total: int, rows: list[int], w: int, lengths, groups, scale):
    mkey = ("bucket", total, tuple(rows), w)
    mask = state.masks.get(mkey)
    if mask is None:
        mask = state.masks[mkey] = bucket_mask(w, [lengths[b] for b in rows], key.device)
    return bucketed_sdpa(query, key[:, :, -w:], value[:, :, -w:], mask, scale, groups).transpose(1, 2)


def ragged_attention(module, query, key, value, attention_mask, **kwargs):
    state = _rows.get()
    if state is None:
        raise RuntimeError("mgaudit_ragged attention used outside a ragged_step() block")
    if query.shape[2] != 1:
        raise RuntimeError("ragged attention is for single-token decode steps")
    if kwargs.get("position_bias") is not None:
        raise RuntimeError("ragged attention does not handle a position bias")
    layer_idx = getattr(module, "layer_idx", None)
    window = _layer_window(state, layer_idx, kwargs.get("sliding_window"))
    total, offset = _layer_offset(state, layer_idx, key.shape[2])
    base = state.base if state.base is not None else _eager_fn(module)
    direct = (_direct_sdpa_ok(base, module, key) and not kwargs.get("dropout")
              and kwargs.get("softcap") is None and kwargs.get("s_aux") is None)
    groups = getattr(module, "num_key_value_groups", 1)
    gqa = groups > 1
    if state.bucket and direct and window is None and offset == 0:
        return _bucketed(state, query, key, value, total, groups, kwargs.get("scaling"))
    outs = []
    for b, s in enumerate(state.starts):
        first = s if window is None else max(s, total - window)
        lo = first - offset
        if lo < 0 or first >= total:
            raise RuntimeError(f"ragged attention: layer {layer_idx} holds no column {first} for row {b} "
                               f"(pass the batch cache to ragged_step, or build it with cache_ops.pad_cache_left)")
        mask = _solo_mask(state, total - first, window, query.dtype, query.device)
        if direct and mask is None:
            o = torch.nn.functional.scaled_dot_product_attention(
                query[b:b + 1], key[b:b + 1, :, lo:], value[b:b + 1, :, lo:], attn_mask=None, dropout_p=0.0,
                scale=kwargs.get("scaling"), is_causal=False, enable_gqa=gqa)
            outs.append(o.transpose(1, 2))
            continue
        k = key[b:b + 1, :, lo:, :].contiguous()
        v = value[b:b + 1, :, lo:, :].contiguous()
        o, _ = base(module, query[b:b + 1], k, v, mask, **kwargs)
        outs.append(o)
    return torch.cat(outs, dim=0).contiguous(), None


@contextlib.contextmanager
def attention_implementation(model, name: str, fn) -> Iterator[str]:
    """Within the block the model runs attention implementation ``name`` (``fn``, registered with
    transformers); yields the implementation it had, restored in ``finally``."""
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(name, fn)
    config = model.config
    base = config._attn_implementation
    config._attn_implementation = name
    try:
        yield base
    finally:
        config._attn_implementation = base


# --------------------------------------------------------------------------- mixture of experts

_moe_cache: "weakref.WeakKeyDictionary[Any, list]" = weakref.WeakKeyDictionary()


def moe_blocks(model) -> list[torch.nn.Module]:
    """The sparse mixture-of-experts blocks of a model: modules with an ``experts`` child and a
    router (``gate`` or ``router``) child, the layout of Mixtral, Qwen2/3-MoE, OLMoE, gpt-oss...)."""
    found = _moe_cache.get(model)
    if found is None:
        found = []
        for module in model.modules():
            children = dict(module.named_children())
            if "experts" in children and ("gate" in children or "router" in children):
                found.append(module)
        _moe_cache[model] = found
    return found


def _one_row_at_a_time(module, forward):

    def per_row(hidden_states, *args, **kwargs):
        if hidden_states.shape[0] <= 1:
            return forward(hidden_states, *args, **kwargs)
        outs = [forward(hidden_states[b:b + 1], *args, **kwargs) for b in range(hidden_states.shape[0])]
        if isinstance(outs[0], tuple):
            return tuple(torch.cat([o[i] for o in outs], dim=0) if torch.is_tensor(outs[0][i]) else outs[0][i]
                         for i in range(len(outs[0])))
        return torch.cat(outs, dim=0)

    return per_row


@contextlib.contextmanager
def ragged_step(model, starts: Sequence[int], cache=None, bucket: int | None = None,
                share_span: int = 0) -> Iterator[None]:
    """Run the model's forward passes in this block with ragged attention.

    ``bucket`` selects the batch-invariant contract's attention (see :func:`_bucketed`) for the
    layers that call sdpa directly with no window; ``share_span`` lets rows share one call.

    ``cache`` (optional): the batch cache the forward runs on. Without it, every layer's
    K/V must hold all columns (as :func:`mgaudit.decoding.cache_ops.pad_cache_left` builds them);
    with it, caches whose sliding layers keep only their window work too.
    """
    config = model.config
    base_name = config._attn_implementation
    if base_name == RAGGED:
        raise RuntimeError("nested ragged_step")
    state = _State(list(starts), base_name, _attention_fn(base_name), layer_windows(model), config, cache,
                   bucket=bucket, share_span=share_span)
    token = _rows.set(state)
    patched: list[tuple[torch.nn.Module, Any]] = []
    try:
        with attention_implementation(model, RAGGED, ragged_attention):
            for module in moe_blocks(model):
                previous = vars(module).get("forward")
                patched.append((module, previous))
                module.forward = _one_row_at_a_time(module, previous or type(module).forward.__get__(module))
            yield
    finally:
        for module, previous in reversed(patched):
            if previous is None:
                vars(module).pop("forward", None)
            else:
                module.forward = previous
        _rows.reset(token)
