"""What the audit core passes around: the request a prompt becomes, the decoding settings, and
the step record of one decoded sequence (:class:`Steps`), whatever backend produced it."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

from ..decoding.sampling import GREEDY, Sampling
from ..prompts import Prompt

#: Tokens per step a server lists (its ``top_logprobs``; vLLM allows 20 at most): how far below its
#: token the reference put a candidate's token.
ALTERNATIVES = 5
#: The same for the local model: its logits are at hand, so more (flat steps can tie many tokens).
LOCAL_ALTERNATIVES = 20


@dataclass(frozen=True)
class Settings:
    """How every run of a job decodes: the same for the reference and the candidate. ``sampling``:
    greedy, or seeded sampling (each request draws from its prompt's own stream, :meth:`draw_seed`)."""

    max_new_tokens: int
    chat: bool = True
    contract: str = "solo"  # local reference runs: stock solo kernels or the batch-invariant ones
    sampling: Sampling = GREEDY

    def key(self) -> dict[str, Any]:
        key: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "chat": self.chat, "contract": self.contract}
        if not self.sampling.greedy:  # greedy keys stay what they were
            key["sampling"] = self.sampling.key()
        return key

    def draw_seed(self, request: "Request") -> int | None:
        """The draw seed of a request (None when decoding greedily)."""
        return None if self.sampling.greedy else self.sampling.draw_seed(request.id)


@dataclass(frozen=True)
class Request:
    """One prompt as a backend receives it: token ids where mgaudit tokenized it (chat template
    applied by mgaudit), or None where a server applies its own template to ``prompt``."""

    prompt: Prompt
    index: int  # position in the prompt set as given
    ids: tuple[int, ...] | None = None

    @property
    def id(self) -> str:
        return self.prompt.id

    @property
    def prompt_len(self) -> int | None:
        return None if self.ids is None else len(self.ids)

    def digest(self, chat: bool) -> str:
        """What the backend is sent, hashed (the reference cache's key part)."""
        body: dict[str, Any] = {"ids": list(self.ids)} if self.ids is not None else \
            {"messages": self.prompt.as_messages()} if chat else {"text": self.prompt.as_text()}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@dataclass
class Steps:
    """One decoded sequence, step by step: the token taken, the runner-up, and the top-1 and
    top-2 logits (logprobs for a server; their difference is the margin either way; NaN where
    the backend gave none). Sampled: ``top1`` is the score of the token taken and ``top2`` that
    score minus the step's margin (:mod:`mgaudit.decoding.sampling`), ``kind`` which margin was the
    smaller; a server's sampled steps carry the token's logprob in ``top1`` and no margin (its
    draws are unknown). ``alternatives``: per greedy step, the best tokens with their logits
    (logprobs), best first, where the backend lists them (:data:`ALTERNATIVES`,
    :data:`LOCAL_ALTERNATIVES`): how far below its own token a reference put a candidate's.
    ``max_abs_diff``: per step, the largest |logit difference| from the reference run (local runs
    against a reference with kept logits); ``logits``: per step, kept only where a later
    comparison needs them; ``meta``: what the backend reported besides."""

    tokens: list[int] = field(default_factory=list)
    top1: list[float] = field(default_factory=list)
    top2: list[float] = field(default_factory=list)
    runner_up: list[int] = field(default_factory=list)
    max_abs_diff: list[float | None] | None = None
    logits: list[Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    kind: list[str | None] | None = None
    alternatives: list[list[tuple[int, float]]] | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def margins(self) -> list[float]:
        return [a - b for a, b in zip(self.top1, self.top2)]

    def margin(self, t: int) -> float | None:
        """The margin at step ``t`` (None past the end or where unknown)."""
        if t >= len(self.tokens):
            return None
        m = self.top1[t] - self.top2[t]
        return m if math.isfinite(m) else None

    def gap(self, t: int, token: int) -> tuple[float | None, bool]:
        """How far below its own token this run put ``token`` at step ``t``: (gap, exact). Exact where
        ``token`` is listed (the runner-up, or an alternative); else a lower bound (the gap to the last
        token listed, which ``token`` is not above), or None where nothing bounds it."""
        if t >= len(self.tokens) or not math.isfinite(self.top1[t]):
            return None, False
        alts = self.alternatives[t] if self.alternatives is not None and t < len(self.alternatives) else None
        if alts:
            listed = dict(alts)
            if token in listed:
                return self.top1[t] - listed[token], True
            return self.top1[t] - alts[-1][1], False
        if token == self.runner_up[t]:
            return self.margin(t), True
        m = self.margin(t)
        return m, False  # not the runner-up: at least the margin below

    @classmethod
    def of(cls, run: Any, **meta: Any) -> "Steps":
        """A :class:`Steps` from any run object with ``tokens``, ``top1``, ``top2``, ``runner_up``
        (and optionally ``max_abs_diff``, ``logits``)."""
        if isinstance(run, Steps):
            if meta:
                run.meta.update(meta)
            return run
        kind = getattr(run, "kind", None)
        return cls([int(t) for t in run.tokens], [float(x) for x in run.top1], [float(x) for x in run.top2],
                   [int(t) for t in run.runner_up], getattr(run, "max_abs_diff", None),
                   getattr(run, "logits", None), dict(meta), list(kind) if kind is not None else None,
                   getattr(run, "alternatives", None))

    def head(self, n: int) -> "Steps":
        """The first ``n`` steps (no logits, no diffs)."""
        return Steps(self.tokens[:n], self.top1[:n], self.top2[:n], self.runner_up[:n], meta=dict(self.meta),
                     kind=self.kind[:n] if self.kind is not None else None,
                     alternatives=None if self.alternatives is None else self.alternatives[:n])

    def extend(self, other: "Steps", start: int, stop: int | None = None) -> None:
        """Append ``other``'s steps ``start:stop``."""
        sl = slice(start, stop)
        n = len(self.tokens)
        self.tokens += other.tokens[sl]
        self.top1 += other.top1[sl]
        self.top2 += other.top2[sl]
        self.runner_up += other.runner_up[sl]
        if self.kind is not None:
            self.kind += other.kind[sl] if other.kind is not None else [None] * len(other.tokens[sl])
        if self.alternatives is not None or other.alternatives is not None:
            mine = self.alternatives if self.alternatives is not None else [[] for _ in range(n)]
            theirs = other.alternatives[sl] if other.alternatives is not None else \
                [[] for _ in other.tokens[sl]]
            self.alternatives = mine + list(theirs)

    def to_json(self) -> dict[str, Any]:
        def num(x: float) -> float | None:
            return x if math.isfinite(x) else None

        out = {"tokens": self.tokens, "top1": [num(x) for x in self.top1], "top2": [num(x) for x in self.top2],
               "runner_up": self.runner_up, "meta": self.meta}
        if self.kind is not None:
            out["kind"] = self.kind
        if self.alternatives is not None:
            out["alternatives"] = [[[i, v] for i, v in step] for step in self.alternatives]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Steps":
        def num(x: Any) -> float:
            return math.nan if x is None else float(x)

        alts = data.get("alternatives")
        return cls(list(data["tokens"]), [num(x) for x in data["top1"]], [num(x) for x in data["top2"]],
                   list(data["runner_up"]), meta=dict(data.get("meta") or {}), kind=data.get("kind"),
                   alternatives=None if alts is None else [[(int(i), float(v)) for i, v in step] for step in alts])
