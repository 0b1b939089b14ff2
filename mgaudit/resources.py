"""Will a decode fit in memory? An estimate made before decoding, from the model's config.

The estimate is an upper bound of what a padded batch adds on top of the loaded
weights: the K/V cache for ``prompt + new`` tokens of every row, the transient
activations of one layer during prefill (hidden states, MLP intermediates, and the
attention scores of a math-kernel attention), the last-position logits, and (for
``scan``) the full-vocabulary solo logits it keeps as references. It is compared
with the memory available now on the device (``MemAvailable`` on CPU, free memory
on CUDA); a batch that cannot fit is a :class:`~mgaudit.errors.ResourceError`
before any work starts, instead of a swap storm or an out-of-memory traceback
halfway through.
"""

from __future__ import annotations

import os
from typing import Any

from .errors import ResourceError

#: Refuse when the estimate exceeds this share of the available memory.
HEADROOM = 0.9


def _cfg(config: Any, *names: str, default: int | None = None) -> int | None:
    for n in names:
        v = getattr(config, n, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return default


def decode_bytes(config: Any, batch_size: int, prompt_len: int, new_tokens: int, dtype_bytes: int,
                 kept_logits_rows: int = 0) -> int | None:
    """Bytes a left-padded batch of ``batch_size`` rows, ``prompt_len`` wide, needs to decode
    ``new_tokens`` tokens (see the module doc); None where the config lacks the sizes."""
    hidden = _cfg(config, "hidden_size", "n_embd", "d_model")
    layers = _cfg(config, "num_hidden_layers", "n_layer", "num_layers")
    heads = _cfg(config, "num_attention_heads", "n_head")
    vocab = _cfg(config, "vocab_size")
    if not (hidden and layers and heads and vocab):
        return None
    kv_heads = _cfg(config, "num_key_value_heads", default=heads)
    head_dim = _cfg(config, "head_dim", default=hidden // heads)
    inter = _cfg(config, "intermediate_size", "n_inner", default=4 * hidden)
    total = prompt_len + new_tokens
    kv = 2 * layers * kv_heads * head_dim * batch_size * total * dtype_bytes
    tokens = batch_size * prompt_len
    activations = tokens * (4 * hidden + 3 * inter) * dtype_bytes
    scores = batch_size * heads * prompt_len * prompt_len * 4
    logits = 2 * batch_size * vocab * 4
    kept = kept_logits_rows * vocab * dtype_bytes
    return int(kv + activations + scores + logits + kept)


def available_bytes(device: str) -> int | None:
    """Memory free for new allocations on ``device`` now; None where it cannot be told."""
    if str(device).startswith("cuda"):
        try:
            import torch

            free, _ = torch.cuda.mem_get_info(torch.device(device))
            return int(free)
        except Exception:
            return None
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gib(n: int) -> str:
    if n >= 2**27:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**17 else f"{n / 2**10:.1f} KiB"


def check_fits(lm: Any, batch_size: int, prompt_len: int, new_tokens: int, kept_logits_rows: int = 0) -> int | None:
    """Raise ResourceError if decoding a batch of ``batch_size`` on ``lm`` cannot fit; return the estimate."""
    import torch

    dtype_bytes = torch.empty((), dtype=getattr(torch, lm.dtype)).element_size()
    needed = decode_bytes(lm.model.config, batch_size, prompt_len, new_tokens, dtype_bytes, kept_logits_rows)
    free = available_bytes(lm.device)
    if needed is None or free is None:
        return needed
    if needed > HEADROOM * free:
        raise ResourceError(
            f"batch size {batch_size} with prompts of up to {prompt_len} tokens and {new_tokens} new tokens needs "
            f"about {_gib(needed)}, but only {_gib(free)} is free on {lm.device}",
            needed_bytes=needed, available_bytes=free, batch_size=batch_size,
            hint="use a smaller batch size, fewer prompts or fewer new tokens")
    return needed
