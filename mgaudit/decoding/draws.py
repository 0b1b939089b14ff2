"""Counter-based random draws for seeded sampling: noise that depends only on (draw seed, counter,
token id), never on the batch a prompt shares.

A prompt's **draw seed** is derived from the run's sampling seed and the prompt's id
(:func:`draw_seed`); the **counter** of a draw is the decode step it belongs to. For each
(draw seed, counter) pair, :func:`row_keys` derives two 32-bit keys (BLAKE2b), and a token's
32 random bits are ``mix(mix(token ^ k0) ^ k1)`` with ``mix`` the ``lowbias32`` integer hash (a
bijection of 32-bit integers, so no two tokens of one draw share their bits). The bits become a
uniform ``u = (h + 0.5) / 2**32`` and a Gumbel variate ``g = -log(-log(u))``.

Every operation on a tensor here is integer arithmetic (exact on any device and for any shape);
the Gumbel transform runs on Python floats (the platform's ``log``, one call per token that
needs it), so a token's noise is the same bits whether its row is decoded alone or in a batch.
For the bound-based search over a whole vocabulary (:func:`gumbel_bounds`) the 2**16 buckets of
the top 16 bits carry precomputed lower and upper bounds of ``g``.
"""

from __future__ import annotations

import hashlib
import math
from typing import TYPE_CHECKING, Sequence


if TYPE_CHECKING:
    import torch

MASK32 = 0xFFFFFFFF
#: Largest draw seed: 31 bits, which every server's ``seed`` field takes.
SEED_BITS = 31


def draw_seed(sample_seed: int, prompt_id: str) -> int:
    """The draw seed of one prompt: derived from the run's ``sample_seed`` and the prompt's id
    (the same prompt gets the same draws wherever it sits in a prompt set or a batch)."""
    digest = hashlib.blake2b(f"mgaudit-draw\x00{int(sample_seed)}\x00{prompt_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << SEED_BITS) - 1)


def row_keys(seed: int, counter: int) -> tuple[int, int]:
    """The two 32-bit keys of draw ``counter`` of the stream ``seed``."""
    digest = hashlib.blake2b(int(seed).to_bytes(8, "little") + int(counter).to_bytes(8, "little"),
                             digest_size=8, person=b"mgaudit-ctr").digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")


def _mix(x: torch.Tensor) -> torch.Tensor:
    """``lowbias32`` in place on 32-bit integers held in int64: a bijection with good avalanche. Each
    product stays below 2**63 (a constant above 2**31 is taken mod 2**32 as a negative number)."""
    x ^= x >> 16
    x *= 0x7FEB352D
    x &= MASK32
    x ^= x >> 15
    x *= 0x846CA68B - (1 << 32)
    x &= MASK32
    x ^= x >> 16
    return x


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """``lowbias32`` in place on int32 tensors (the bits of the unsigned value, two's complement):
    products wrap mod 2**32 and arithmetic shifts are masked to logical ones. A fifth of the memory
    traffic of :func:`_mix`; used where :func:`_int32_wraps` has checked it gives the same bits."""
    x ^= (x >> 16) & 0xFFFF
    x *= 0x7FEB352D
    x ^= (x >> 15) & 0x1FFFF
    x *= 0x846CA68B - (1 << 32)
    x ^= (x >> 16) & 0xFFFF
    return x


def _signed32(keys: torch.Tensor) -> torch.Tensor:
    """int64 values in ``[0, 2**32)`` as int32 with the same bits."""
    import torch

    return (keys - ((keys >> 31) << 32)).to(torch.int32)


_WRAPS: dict[str, bool] = {}


def _int32_wraps(device) -> bool:
    """Whether this device's int32 kernels give :func:`_mix`'s bits (they wrap on every platform
    torch supports, but signed overflow is not a promise): checked once per device, on lengths that
    take the vectorized loops and their tails."""
    import torch

    key = str(device)
    if key not in _WRAPS:
        keys = torch.tensor([[0, 0], [0xFFFFFFFF, 0x80000000], [0x9E3779B9, 0x7F4A7C15]], dtype=torch.int64,
                            device=device)
        ids = torch.cat([torch.arange(4133, dtype=torch.int64), torch.tensor([0x7FFFFFFF])]).to(device)
        narrow = _mix32(_mix32(ids.to(torch.int32) ^ _signed32(keys[:, :1])) ^ _signed32(keys[:, 1:]))
        _WRAPS[key] = bool(torch.equal(bits(keys, ids), narrow.to(torch.int64) & MASK32))
    return _WRAPS[key]


def bits32(keys: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The bits of :func:`bits` as int32 (the two's complement of the unsigned value); ``tokens``
    ids below 2**31, int32 or int64."""
    import torch

    if not _int32_wraps(tokens.device):
        return _signed32(bits(keys, tokens.to(torch.int64)))
    x = _mix32(tokens.to(torch.int32) ^ _signed32(keys[:, :1]))
    x ^= _signed32(keys[:, 1:])
    return _mix32(x)


def bits(keys: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """32 random bits (int64 in ``[0, 2**32)``) per token: ``keys`` ``[rows, 2]`` int64,
    ``tokens`` ``[rows, n]`` (or ``[n]``, the same ids for every row) int64."""
    x = _mix(tokens ^ keys[:, :1])
    x ^= keys[:, 1:]
    return _mix(x)


def keys_tensor(pairs: Sequence[tuple[int, int]], device) -> torch.Tensor:
    import torch

    return torch.tensor([list(p) for p in pairs], dtype=torch.int64, device=device).reshape(-1, 2)


def gumbel(h: int) -> float:
    """The Gumbel variate of 32 random bits."""

    return -math.log(-math.log((h + 0.5) / 2 ** 32))


_BOUNDS: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
_UPPER: list[list[float]] = []


def gumbel_upper() -> list[float]:
    """Per value of the top 16 bits, an upper bound of the Gumbel value of the draw (Python floats)."""
    if not _UPPER:
        _UPPER.append([math.nextafter(gumbel((j << 16) | 0xFFFF), math.inf) for j in range(1 << 16)])
    return _UPPER[0]


def gumbel_bounds(device) -> tuple[torch.Tensor, torch.Tensor]:
    """(lower, upper) float32 bounds of the Gumbel value of every draw whose top 16 bits are the
    index (rounded outward)."""
    import torch

    key = str(device)
    if key not in _BOUNDS:
        lo, hi = [], []
        for j in range(1 << 16):
            a = gumbel(j << 16)
            b = gumbel((j << 16) | 0xFFFF)
            lo.append(math.nextafter(a, -math.inf))
            hi.append(math.nextafter(b, math.inf))
        low = torch.tensor(lo, dtype=torch.float64)
        high = torch.tensor(hi, dtype=torch.float64)
        # outward to float32 as well
        low32 = low.to(torch.float32)
        low32 = torch.where(low32.double() > low, torch.nextafter(low32, torch.tensor(-math.inf)), low32)
        high32 = high.to(torch.float32)
        high32 = torch.where(high32.double() < high, torch.nextafter(high32, torch.tensor(math.inf)), high32)
        _BOUNDS[key] = (low32.to(device), high32.to(device))
    return _BOUNDS[key]



#: A bound on ``|gumbel_near(h) - gumbel(h)|``: both take two float64 logs of the same exact ``u``,
#: each within an ulp or two, so they agree to about 1e-14; this leaves a wide berth.
NEAR = 1e-9


def gumbel_near(h: torch.Tensor) -> torch.Tensor:
    """:func:`gumbel` of every element of ``h`` (int64 in ``[0, 2**32)``) in float64 tensor
    arithmetic: within :data:`NEAR` of it, not its bits; for ruling tokens out, never for a score."""
    u = (h.double() + 0.5) / 2 ** 32
    return -(-u.log()).log()
