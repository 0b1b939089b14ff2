"""Reading a server's answers: one completion choice into per-step token ids and top-2 logprobs.

Two answer shapes are read: ``logprobs.content[i]`` with ``top_logprobs`` lists (llama.cpp,
OpenAI chat, vLLM chat) and the legacy completions shape ``logprobs.tokens / token_logprobs /
top_logprobs`` (OpenAI, vLLM completions). Where a server gives token strings but no ids, a
:class:`TokenMap` turns strings into ids (through a tokenizer when one is given) and says so.

The margin of a step is top-1 logprob minus top-2 logprob. Both logprobs share the softmax
normaliser, so this is the logit margin. Errors are :class:`EndpointError` (an
:class:`~mgaudit.errors.InputError`, exit code 2).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

from ..errors import InputError

#: Token ids made up for strings no tokenizer maps start here.
LABEL_BASE = 1 << 40


class EndpointError(InputError):
    """The server cannot be reached, refuses, or answers in a shape we cannot audit."""


class NoLogprobsError(EndpointError):
    """The server answered without logprobs: only a tokens-only audit is possible."""


@dataclass
class Completion:
    """One greedy completion, step by step. ``top1``/``top2`` are logprobs (NaN where absent)."""

    tokens: list[int]
    top1: list[float]
    top2: list[float]
    runner_up: list[int]
    text: str
    finish_reason: str | None
    seconds: float
    attempts: int = 1
    cached_tokens: int | None = None
    prompt_tokens: int | None = None
    started: float = 0.0  # perf_counter at send (for overlap accounting)
    pieces: list[str] | None = None  # the server's text of each token, where it sends it
    alternatives: list[list[tuple[int, float]]] | None = None  # per step: (id, logprob) listed, best first
    token_logprobs: list[float] | None = None  # the logprob the server gave each token it took (sampled runs)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def margins(self) -> list[float]:
        return [a - b for a, b in zip(self.top1, self.top2)]


class TokenMap:
    """Token strings -> ids for servers that return no ids.

    With a tokenizer, a string maps to the id whose decoded text it is (the
    lowest id where several decode alike; ``ambiguous`` counts those). Without
    one, strings get ids in order of first appearance; such ids are labels that
    are equal exactly when the strings are, which is all a comparison needs.
    """

    def __init__(self, tokenizer: Any | None = None):
        self.tokenizer = tokenizer
        self._table: dict[str, int] | None = None
        self._interned: dict[str, int] = {}
        self.ambiguous = 0
        self.unknown = 0
        self.used = False

    def _build(self) -> dict[str, int]:
        table: dict[str, int] = {}
        tok = self.tokenizer
        size = len(tok)
        for i in range(size):
            try:
                s = tok.decode([i])
            except Exception:  # a few special ids fail to decode in some tokenizers
                continue
            if s in table:
                self.ambiguous += 1
                continue
            table[s] = i
        return table

    def id_of(self, token: str) -> int:
        self.used = True
        m = re.fullmatch(r"token_id:(\d+)", token)
        if m:  # vLLM's return_tokens_as_token_ids
            return int(m.group(1))
        if self.tokenizer is not None:
            if self._table is None:
                self._table = self._build()
            found = self._table.get(token)
            if found is not None:
                return found
            self.unknown += 1
        if token not in self._interned:
            # far above any vocabulary: never a real id, never the -1 of an absent token
            self._interned[token] = LABEL_BASE + len(self._interned)
        return self._interned[token]

    def describe(self) -> dict[str, Any] | None:
        if not self.used:
            return None
        return {
            "method": "tokenizer (decoded text of each id)" if self.tokenizer is not None
            else "labels in order of first appearance (no tokenizer given)",
            "ambiguous_vocab_strings": self.ambiguous if self.tokenizer is not None else None,
            "unmapped_strings": self.unknown if self.tokenizer is not None else len(self._interned),
        }


# --------------------------------------------------------------------------- parsing


def _fnum(x: Any) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return math.nan
    return float(x)


def _top_two(entries: list[tuple[int, float]], chosen: int) -> tuple[float, float, int]:
    """(top1 logprob, top2 logprob, runner-up id) from (id, logprob) candidates."""
    ranked = sorted(entries, key=lambda e: -e[1] if math.isfinite(e[1]) else math.inf)
    t1 = ranked[0][1] if ranked else math.nan
    t2 = ranked[1][1] if len(ranked) > 1 else math.nan
    runner = next((i for i, _ in ranked if i != chosen), -1)
    return t1, t2, runner


class ChoiceSteps(NamedTuple):
    """The steps of one answer choice: per step the token taken, the top-1 and top-2 logprobs, the
    runner-up, and the alternatives the server listed (token id, logprob), best first."""

    tokens: list[int]
    top1: list[float]
    top2: list[float]
    runner_up: list[int]
    alternatives: list[list[tuple[int, float]]] | None


def parse_choice(choice: dict[str, Any], tokens_only: bool, token_map: TokenMap,
                 text_to_ids: Callable[[str], list[int]] | None) -> ChoiceSteps:
    """Steps of one answer choice (see :class:`ChoiceSteps`)."""
    lp = choice.get("logprobs")
    if lp is None or lp == {}:
        if not tokens_only:
            raise NoLogprobsError("the server returned no logprobs (field choices[0].logprobs is missing or null)",
                                  hint="give `tokens_only` to audit flips and divergence without margins, or enable "
                                       "logprobs on the server")
        text = choice.get("text")
        if text is None:
            text = (choice.get("message") or {}).get("content") or ""
        ids = text_to_ids(text) if text_to_ids else list(text.encode("utf-8"))
        nan = [math.nan] * len(ids)
        return ChoiceSteps(ids, nan, list(nan), [-1] * len(ids), None)
    if not isinstance(lp, dict):
        raise EndpointError(f"choices[0].logprobs has an unknown shape ({type(lp).__name__})")
    steps: list[tuple[int, list[tuple[int, float]]]] = []  # (chosen, candidates)
    if isinstance(lp.get("content"), list):
        for k, step in enumerate(lp["content"]):
            if not isinstance(step, dict):
                raise EndpointError(f"choices[0].logprobs.content[{k}] is not an object")
            tid = step.get("id")
            chosen = int(tid) if isinstance(tid, int) else token_map.id_of(str(step.get("token", "")))
            cands = []
            for c in step.get("top_logprobs") or []:
                cid = c.get("id")
                cid = int(cid) if isinstance(cid, int) else token_map.id_of(str(c.get("token", "")))
                cands.append((cid, _fnum(c.get("logprob"))))
            steps.append((chosen, cands))
            where = f"choices[0].logprobs.content[{k}].top_logprobs is empty"
            _need(cands, tokens_only, where)
    elif isinstance(lp.get("tokens"), list):
        tops = lp.get("top_logprobs") or []
        for k, tok in enumerate(lp["tokens"]):
            cand_d = tops[k] if k < len(tops) and isinstance(tops[k], dict) else {}
            steps.append((token_map.id_of(str(tok)), [(token_map.id_of(str(t)), _fnum(v)) for t, v in cand_d.items()]))
            _need(steps[-1][1], tokens_only, f"choices[0].logprobs.top_logprobs[{k}]")
    else:
        raise NoLogprobsError("choices[0].logprobs holds neither content nor tokens",
                              hint="give `tokens_only` to audit flips and divergence without margins")
    ids = [c for c, _ in steps]
    if tokens_only:
        nan = [math.nan] * len(ids)
        return ChoiceSteps(ids, nan, list(nan), [-1] * len(ids), None)
    tops = [_top_two(cands, chosen) for chosen, cands in steps]
    ranked = [sorted(((i, v) for i, v in cands if math.isfinite(v)), key=lambda e: -e[1]) for _, cands in steps]
    return ChoiceSteps(ids, [t[0] for t in tops], [t[1] for t in tops], [t[2] for t in tops], ranked)


def _need(cands: list, tokens_only: bool, where: str) -> None:
    if not cands and not tokens_only:
        raise NoLogprobsError(f"the server returned no top_logprobs ({where})",
                              hint="give `tokens_only` to audit flips and divergence without margins, or enable top "
                                   "logprobs on the server")


def token_pieces(choice: dict[str, Any]) -> list[str] | None:
    """The text of each generated token as the server sent it (None where it sent none)."""
    lp = choice.get("logprobs")
    if not isinstance(lp, dict):
        return None
    if isinstance(lp.get("content"), list):
        return [str(step.get("token", "")) if isinstance(step, dict) else "" for step in lp["content"]]
    if isinstance(lp.get("tokens"), list):
        return [str(t) for t in lp["tokens"]]
    return None


def taken_logprobs(choice: dict[str, Any]) -> list[float] | None:
    """The logprob the server reported for each token it took (None where it sent none)."""
    lp = choice.get("logprobs")
    if not isinstance(lp, dict):
        return None
    if isinstance(lp.get("content"), list):
        return [_fnum(step.get("logprob")) if isinstance(step, dict) else math.nan for step in lp["content"]]
    if isinstance(lp.get("token_logprobs"), list):
        return [_fnum(v) for v in lp["token_logprobs"]]
    return None


def logprob_precision(values: list[float]) -> dict[str, Any]:
    """How precise the logprobs the server sent are: float32-exact? decimals seen?"""
    finite = [v for v in values if math.isfinite(v) and v != 0.0]
    if not finite:
        return {"values": 0}
    import numpy as np

    arr = np.asarray(finite, dtype=np.float64)
    f32 = bool(np.all(arr.astype(np.float32).astype(np.float64) == arr))
    decimals = max(len(repr(v).split(".")[1]) if "." in repr(v) and "e" not in repr(v) else 17 for v in finite[:2000])
    return {"values": len(finite), "float32_exact": f32, "max_decimals": decimals,
            "reading": "float32 (every value is a float32 number)" if f32 else
            (f"rounded to {decimals} decimals" if decimals < 9 else "float64")}
