"""Surgery on transformers K/V caches for batched decoding with per-row verification.

The batched decode keeps one left-padded cache for the batch (row ``b`` is valid
from column ``starts[b]``); the verifier works on batch-1 copies of one row. These
helpers are the only code that reads or writes cache tensors directly.

Columns are *absolute*: column ``c`` of the batch is the ``c``-th position of the
left-padded sequence, whatever a cache layer physically keeps. transformers 5 builds
``DynamicCache(config=...)`` with one layer class per layer type: a full-attention
layer (``DynamicLayer``) keeps every column; a sliding-window layer
(``DynamicSlidingWindowLayer``, Mistral / Qwen2 / Gemma / Phi3 windows) keeps only
the last ``window - 1`` columns (``cumulative_length`` counts all of them), since a
query at column ``q`` sees only columns ``k > q - window`` (the ``window - 1``
previous ones and itself). So:

* :func:`pad_cache_left` builds the *ragged* batch cache with full-length
  ``DynamicLayer`` s in every layer: ragged attention (``mgaudit.decoding.ragged``) applies
  each layer's window itself, and the verifier can copy any row's history out.
  Columns a solo prefill's sliding layer had already dropped (a prompt longer than
  the window) are zeros there; they lie outside every later window of that row.
* :func:`row_cache` gives the verifier a batch-1 cache of the model's own layer
  classes, built exactly as a solo run's cache stands after the same tokens (the
  sliding layers see the same visible columns, have the same ``cumulative_length``
  and so the same masks), but whose sliding layers keep every column they are given
  (``activate_past_recording``), so that :func:`write_columns` can copy back more
  than ``window - 1`` replayed columns.
* :func:`batch_cache` is the cache for a generate-style *padded* batched prefill that
  a verifier will copy rows out of: the model's own layer classes with the sliding
  layers recording their past (the attention still sees only the window).
* :func:`write_columns` / :func:`columns_equal` address the last columns, which
  every layer kind holds.
"""

from __future__ import annotations

from typing import Any, Sequence

from .step import new_cache


def cache_layers(cache):
    return cache.layers


def is_sliding(layer) -> bool:
    return bool(getattr(layer, "is_sliding", False))


def layer_window(layer) -> int | None:
    """The sliding window of a cache layer (None for a full-attention layer)."""
    return int(layer.sliding_window) if is_sliding(layer) else None


def layer_span(layer) -> tuple[int, int]:
    """(first, end): the absolute columns [first, end) a cache layer physically holds.

    A full layer holds [0, n); a sliding layer has seen ``cumulative_length`` columns
    and holds the last ``keys.shape[-2]`` of them.
    """
    if not getattr(layer, "is_initialized", True) or layer.keys is None:
        return 0, 0
    held = layer.keys.shape[-2]
    end = int(layer.get_seq_length()) if is_sliding(layer) else held
    return end - held, end


def _keep_all_columns(cache):
    """Sliding layers of ``cache`` keep every column (their attention still sees the window)."""
    for layer in cache_layers(cache):
        if is_sliding(layer) and hasattr(layer, "activate_past_recording"):
            layer.activate_past_recording()
    return cache


def batch_cache(model):
    """A new cache of the model's own layer classes whose sliding layers keep every column.

    For a padded batched prefill whose rows a verifier copies out later (the sliding
    layers of ``new_cache`` drop the column a verifier needs once a row passes its
    window). The attention computed on it is the same as on ``new_cache``.
    """
    return _keep_all_columns(new_cache(model))


def _full_cache():
    from transformers import DynamicCache

    return DynamicCache()  # DynamicLayer in every layer, created on update


def pad_cache_left(model, solo_caches: Sequence[Any], lengths: Sequence[int], zero_columns: int = 0):
    """One left-padded batch cache from per-row batch-1 caches (pads are zeros).

    ``zero_columns`` extra zero columns go in front of every row (the batch-invariant attention pads
    each row to a multiple of its bucket from them).
    Every layer of the result is a full-length ``DynamicLayer`` (``width`` columns), also
    for the model's sliding-window layers: ragged attention applies the windows. Columns
    a solo sliding layer no longer held are zeros (outside every later window).
    """
    n_layers = len(cache_layers(solo_caches[0]))
    rows = []
    for b, (c, n) in enumerate(zip(solo_caches, lengths)):
        row = []
        for i, layer in enumerate(cache_layers(c)):
            first, end = layer_span(layer)
            if end != n:
                raise RuntimeError(f"layer {i} of row {b}'s cache has seen {end} columns, expected {n}")
            row.append((layer.keys, layer.values, first))
        rows.append(row)
    return pad_columns_left(rows, lengths, zero_columns, n_layers)


def pad_columns_left(rows: Sequence[Sequence[tuple[Any, Any, int]]], lengths: Sequence[int], zero_columns: int = 0,
                     n_layers: int | None = None):
    """One left-padded batch cache (zeros in front) from per row, per layer ``(K, V, first)``: the
    row's batch-1 K/V tensors holding its columns ``first..length``."""
    cache = _full_cache()
    width = max(lengths) + zero_columns
    for i in range(n_layers if n_layers is not None else len(rows[0])):
        k0, v0 = rows[0][i][0], rows[0][i][1]
        K = k0.new_zeros((len(rows), k0.shape[1], width, k0.shape[3]))
        V = v0.new_zeros((len(rows), v0.shape[1], width, v0.shape[3]))
        for b, (row, n) in enumerate(zip(rows, lengths)):
            k, v, first = row[i]
            K[b, :, width - n + first:] = k[0]
            V[b, :, width - n + first:] = v[0]
        cache.update(K, V, i)
    return cache


def row_cache(model, cache, b: int, start: int, end: int):
    """A batch-1 cache holding row ``b``'s absolute columns [start, end) of a batch cache.

    The result has the model's own layer classes and is, for the forward that follows,
    the cache a solo run has after the same ``end - start`` tokens: sliding layers have
    ``cumulative_length == end - start`` and see the same window; they keep every column
    they were given (for :func:`write_columns` of several replayed columns).
    """
    one = _keep_all_columns(new_cache(model))
    n = end - start
    for i, layer in enumerate(cache_layers(cache)):
        first, _ = layer_span(layer)
        lo = max(start, first)
        # the columns the next forward of this row can still see
        target = cache_layers(one)[i] if i < len(cache_layers(one)) else None
        window = layer_window(target) if target is not None else None
        needed = start if window is None else max(start, end - (window - 1))
        if lo > needed:
            raise RuntimeError(
                f"cache layer {i} no longer holds column {needed} that row {b} still attends to "
                f"(it holds {first}..); build the batch cache with cache_ops.batch_cache or pad_cache_left")
        # update() copies the views into the new cache (one copy per layer)
        one.update(layer.keys[b:b + 1, :, lo - first:end - first], layer.values[b:b + 1, :, lo - first:end - first], i)
        if lo > start:  # a sliding source dropped columns outside the window: count them all the same
            cache_layers(one)[i].cumulative_length = n
    return one


def write_columns(cache, one, b: int, n: int = 1) -> None:
    """Replace row ``b``'s last ``n`` K/V columns of ``cache`` by the last ``n`` columns of ``one``.

    A layer that holds fewer than ``n`` columns (a sliding layer) gets the ones it holds.
    """
    for i, (layer, src) in enumerate(zip(cache_layers(cache), cache_layers(one))):
        m = min(n, layer.keys.shape[-2])
        if src.keys.shape[-2] < m:
            raise RuntimeError(f"cache layer {i}: the row cache holds {src.keys.shape[-2]} columns, {m} to write")
        layer.keys[b, :, -m:] = src.keys[0, :, -m:]
        layer.values[b, :, -m:] = src.values[0, :, -m:]


def columns_equal(cache, one, b: int) -> bool:
    """Whether row ``b``'s last K/V column of ``cache`` equals the last column of ``one``, bit for bit."""
    import torch

    for layer, src in zip(cache_layers(cache), cache_layers(one)):
        if not (torch.equal(layer.keys[b, :, -1], src.keys[0, :, -1])
                and torch.equal(layer.values[b, :, -1], src.values[0, :, -1])):
            return False
    return True
