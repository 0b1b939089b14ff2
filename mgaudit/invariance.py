"""Row-invariance of the model's linear layers, and a mode that keeps GEMMs
inside the row counts where they are invariant.

Greedy decoding of a batch is exact only if every row computes what it would
compute alone. The linear layers are the part that sees the whole batch as one
GEMM, and some kernels change their reduction order with the row count (on the
project's CPUs, bf16 ``F.linear`` is row-invariant below 64 rows and not from
64). :func:`invariant_rows` measures, on the model's own weight shapes, dtype and
device, the largest row count R such that every row of an M-row GEMM (M <= R)
equals the 1-row result bit for bit. :func:`row_chunked_linears` then splits any
larger GEMM into chunks of at most R rows (restored in ``finally``).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F


def linear_shapes(model) -> dict[tuple[int, int], torch.nn.Linear]:
    """One Linear module per distinct (out, in) weight shape."""
    shapes: dict[tuple[int, int], torch.nn.Linear] = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            shapes.setdefault(tuple(module.weight.shape), module)
    return shapes


@torch.inference_mode()
def invariant_rows(model, up_to: int, seed: int = 0) -> int:
    """Largest R <= ``up_to`` with every Linear shape row-invariant for 1..R rows.

    Each row of an M-row product is compared with the same row multiplied alone;
    random inputs of the model's dtype scaled like normalised activations.
    """
    if up_to <= 1:
        return 1
    gen = torch.Generator(device="cpu").manual_seed(seed)
    best = up_to
    for (_, n_in), lin in linear_shapes(model).items():
        w, b = lin.weight, lin.bias
        x = torch.randn(up_to, n_in, generator=gen).to(device=w.device, dtype=w.dtype)
        solo = torch.cat([F.linear(x[i:i + 1], w, b) for i in range(up_to)])
        for m in range(2, best + 1):
            if not torch.equal(F.linear(x[:m], w, b), solo[:m]):
                best = m - 1
                break
    return max(best, 1)


@contextlib.contextmanager
def row_chunked_linears(model, max_rows: int) -> Iterator[None]:
    """Within the block, every Linear computes at most ``max_rows`` rows per GEMM."""
    patched = []

    def make(lin):
        def forward(x):
            flat = x.reshape(-1, x.shape[-1])
            if flat.shape[0] <= max_rows:
                return F.linear(x, lin.weight, lin.bias)
            parts = [F.linear(c, lin.weight, lin.bias) for c in flat.split(max_rows)]
            return torch.cat(parts).reshape(*x.shape[:-1], -1)

        return forward

    try:
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.forward = make(module)
                patched.append(module)
        yield
    finally:
        for module in patched:
            del module.forward  # back to the class's forward
