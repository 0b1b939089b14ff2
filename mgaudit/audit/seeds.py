"""Does a server honour per-request seeds? The check ``verify --endpoint`` runs under seeded sampling.

A server's random draws are not in its answers, so what can be measured is what its tokens show:

* **repeatable**: the same request alone twice (same prompt, same ``seed``) gives the same tokens;
* **seed matters**: the same request alone with another seed gives other tokens (a server that
  ignores ``seed`` and samples from one global stream fails the first check; one that ignores it
  and decodes greedily, or a prompt whose distribution is nearly one-hot, can fail the second);
* and, by ``verify`` itself, each request alone against the same request with others in flight.

What cannot be measured: the draws themselves, hence no sampling margin and no teacher-forced
flip past a divergence; the logprob the server reports for each token it took is recorded.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from ..decoding.draws import SEED_BITS
from .steps import Request, Settings, Steps


def other_seed(seed: int) -> int:
    """A second seed for the same prompt (a different 31-bit value)."""
    return (seed + 0x5BD1E995) % (1 << SEED_BITS)


def seed_audit(backend, requests: Sequence[Request], settings: Settings, references: Sequence[Steps] | None,
               on_done: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Send every request alone again with its own draw seed (compared with ``references``, its runs
    alone; None: one more run alone first) and with another seed. Returns the counts and the
    prompts that failed."""
    repeat_same, seed_differs, not_repeatable, same_with_other = 0, 0, [], []
    for i, req in enumerate(requests):
        ref = references[i] if references is not None else backend.one(req, settings)
        seed = settings.draw_seed(req)
        again = backend.one(req, settings)
        other = backend.one(req, settings, seed=other_seed(seed))
        if again.tokens == ref.tokens:
            repeat_same += 1
        else:
            not_repeatable.append(req.id)
        if other.tokens != ref.tokens:
            seed_differs += 1
        else:
            same_with_other.append(req.id)
        if on_done:
            on_done(1)
    n = len(requests)
    return {
        "prompts": n,
        "repeatable": repeat_same, "not_repeatable": not_repeatable,
        "seed_changes_output": seed_differs, "same_output_with_another_seed": same_with_other,
        "honours_seeds": n > 0 and repeat_same == n and seed_differs > 0,
        "measured": "tokens of each prompt alone: again with its seed, and with another seed",
        "not_measurable": "the server's random draws (not in its answers): no sampling margin, no teacher-forced "
                          "flips past a divergence; the logprob of each token taken is recorded",
    }
