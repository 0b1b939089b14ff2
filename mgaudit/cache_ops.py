"""Surgery on transformers K/V caches for batched decoding with per-row verification.

The batched decode keeps one left-padded cache for the batch (row ``b`` is valid
from column ``starts[b]``); the verifier works on batch-1 copies of one row. These
helpers are the only code that reads or writes cache tensors directly.
"""

from __future__ import annotations

from typing import Any, Sequence

from .engine import new_cache


def cache_layers(cache):
    return cache.layers


def pad_cache_left(model, solo_caches: Sequence[Any], lengths: Sequence[int]):
    """One left-padded batch cache from per-row batch-1 caches (pads are zeros)."""
    cache = new_cache(model)
    width = max(lengths)
    n_layers = len(cache_layers(solo_caches[0]))
    for i in range(n_layers):
        ks = [cache_layers(c)[i].keys for c in solo_caches]
        vs = [cache_layers(c)[i].values for c in solo_caches]
        k0 = ks[0]
        K = k0.new_zeros((len(ks), k0.shape[1], width, k0.shape[3]))
        V = K.clone()
        for b, (k, v) in enumerate(zip(ks, vs)):
            K[b, :, width - k.shape[2]:] = k[0]
            V[b, :, width - v.shape[2]:] = v[0]
        cache.update(K, V, i)
    return cache


def row_cache(model, cache, b: int, start: int, end: int):
    """A batch-1 cache holding row ``b``'s positions [start, end) of a batch cache."""
    one = new_cache(model)
    for i, layer in enumerate(cache_layers(cache)):
        # update() copies the views into the new cache (one copy per layer)
        one.update(layer.keys[b:b + 1, :, start:end], layer.values[b:b + 1, :, start:end], i)
    return one


def write_columns(cache, one, b: int, n: int = 1) -> None:
    """Replace row ``b``'s last ``n`` K/V columns of ``cache`` by the last ``n`` columns of ``one``."""
    for layer, src in zip(cache_layers(cache), cache_layers(one)):
        layer.keys[b, :, -n:] = src.keys[0, :, -n:]
        layer.values[b, :, -n:] = src.values[0, :, -n:]


def columns_equal(cache, one, b: int) -> bool:
    """Whether row ``b``'s last K/V column of ``cache`` equals the last column of ``one``, bit for bit."""
    import torch

    for layer, src in zip(cache_layers(cache), cache_layers(one)):
        if not (torch.equal(layer.keys[b, :, -1], src.keys[0, :, -1])
                and torch.equal(layer.values[b, :, -1], src.values[0, :, -1])):
            return False
    return True
