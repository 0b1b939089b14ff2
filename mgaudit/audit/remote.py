"""An OpenAI-compatible server as a backend (``--endpoint`` / ``--reference URL``).

Requests are greedy (temperature 0) with the top-2 logprobs; the margin of a step is top-1
logprob minus top-2 logprob (the softmax normaliser cancels). How a prompt reaches the server
(the *route*): token ids to ``/v1/completions`` where mgaudit has a tokenizer (it applies the
chat template itself: both sides of a comparison see the same ids); otherwise chat messages to
``/v1/chat/completions`` (the server's template) or plain text to ``/v1/completions``.

Conditions: ``alone`` (one request, nothing else in flight; the prompt cache off: llama.cpp's
``cache_prompt: false``, and on vLLM with prefix caching a ``cache_salt`` of the request's own, so
that no cached prefix is read), ``in-flight`` (a group sent at once, each request running while
the others are in flight), ``staggered`` (a group sent one request after another, ``spacing``
apart: each joins a batch that is already decoding), ``warm-cache`` (alone, the same request sent
twice with the cache on; the second is recorded, with the prompt tokens it found cached).

Teacher forcing (``forced``): a server cannot be fed tokens one step at a time, but it can be
asked to continue a given prefix. Up to a sequence's first divergence the free-running steps are
teacher-forced already (both runs saw the same prefix). From there on, mgaudit scores the
reference's continuation:

* ``prompt-logprobs`` (vLLM): one request per diverged sequence, prompt = the prompt and the
  reference's tokens, ``prompt_logprobs: 2``: the server's top-2 at every position;
* ``continuation`` (any server that takes token ids): the prompt and the reference's tokens up
  to the divergence, decoded greedily until the server parts from the reference again; then
  again from there: one request per flip.

Either way the forced prefix is processed as a prefill, not step by step: on a server the
teacher-forced steps after a divergence carry the prefill's rounding (``scoring()`` says so).
Without token ids (chat route) nothing past the first divergence can be scored.

Seeded sampling (``settings.sampling``): every request carries ``temperature``, ``top_p``, its
prompt's draw seed as ``seed`` and, where given (always on llama.cpp, whose defaults are not
off), ``top_k`` and ``min_p``. A server does not return its random draws, so a sampled step has
no margin: the step records the token and the logprob the server gave it (``top1``; ``top2`` is
NaN), and nothing past a first divergence is scored (a continuation request does not resume the
server's random stream).
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from typing import Any, Sequence

from ..endpoint.answers import Completion, EndpointError, TokenMap, logprob_precision
from ..endpoint.client import EndpointClient, RequestSpec, ServerInfo
from ..formats.traces import first_divergence
from .backend import VOCAB_TEST, Backend, Done
from .conditions import REMOTE_KINDS, Condition
from .steps import ALTERNATIVES, Request, Settings, Steps

#: Logprobs asked for per step: the top 2 give the margin, the rest how far below the reference put
#: a candidate's token (:data:`mgaudit.audit.steps.ALTERNATIVES`).
TOP_LOGPROBS = ALTERNATIVES
#: Connections the client keeps open (the largest number of requests in flight it sends).
MAX_IN_FLIGHT = 256


class EndpointBackend(Backend):
    kind = "endpoint"
    kinds = REMOTE_KINDS

    def __init__(self, url: str, *, role: str = "candidate", timeout: float = 120.0, retries: int = 3,
                 tokens_only: bool = False, engine_note: str | None = None):
        self.role, self.timeout, self.retries = role, timeout, retries
        self.tokens_only, self.engine_note = tokens_only, engine_note
        self.tokenizer, self.tokenizer_info = None, None
        self.chat = True  # prompts go through a chat template (the job's setting)
        self.sampling = None  # the job's Sampling (None: greedy), for the provenance
        self._loop = asyncio.new_event_loop()
        self._client: EndpointClient | None = None
        self._values: list[float] = []  # logprobs seen (their precision goes into the summary)
        self._scoring: dict[str, Any] = {"route": "none", "requests": 0, "sequences": 0}
        self._routes: list[str] = []  # the scoring routes used, in order
        self._prompt_logprobs: bool | None = None  # unknown until tried
        try:
            self.info: ServerInfo = self._run(_identify(url, min(timeout, 10.0)))
        except BaseException:
            self._loop.close()
            raise
        self.url = self.info.base_url

    # ------------------------------------------------------------------ set-up

    def use_tokenizer(self, tokenizer: Any, info: dict[str, Any] | None) -> None:
        """Send token ids made by ``tokenizer`` (None: the server tokenizes); opens the client."""
        self.tokenizer, self.tokenizer_info = tokenizer, info
        if self._client is not None:
            self._run(self._client.__aexit__(None, None, None))
        tok = tokenizer
        text_to_ids = (lambda text: [int(i) for i in tok.encode(text, add_special_tokens=False)]) if tok else None
        self._client = EndpointClient(self.url, concurrency=MAX_IN_FLIGHT, timeout=self.timeout,
                                      retries=self.retries, tokens_only=self.tokens_only,
                                      token_map=TokenMap(tok), text_to_ids=text_to_ids)
        self._run(self._client.__aenter__())

    @property
    def client(self) -> EndpointClient:
        if self._client is None:
            self.use_tokenizer(None, None)
        return self._client

    def _run(self, coro):
        return self._loop.run_until_complete(coro)

    def close(self) -> None:
        try:
            if self._client is not None:
                self._run(self._client.__aexit__(None, None, None))
        finally:
            self._loop.close()

    @property
    def label(self) -> str:
        return f"{self.info.engine} at {self.url}"

    @property
    def route(self) -> str:
        """How prompts reach the server."""
        if self.tokenizer is not None:
            return "completions (prompt as token ids, template applied by mgaudit)" if self.chat else \
                "completions (prompt as token ids, tokenized by mgaudit)"
        if self.chat:
            return "chat/completions (template applied by the server)"
        return "completions (prompt as text, tokenized by the server)"

    def stack(self) -> dict[str, Any]:
        from .. import __version__

        info = self.info
        name = info.model or (info.fingerprint.get("props") or {}).get("model_path") or "unknown"
        return {
            "model": {"name": str(name), "source": f"endpoint:{info.base_url}", "sha256": None, "dtype": "server",
                      "device": "endpoint", "engine": info.engine, "tokenizer": self.tokenizer_info},
            "endpoint": {**info.fingerprint, "engine_note": self.engine_note, "tokens_only": self.tokens_only,
                         "slots": info.slots, "route": self.route,
                         "request": {**_request_sampling(self.sampling, info.engine),
                                     "top_logprobs": None if self.tokens_only else TOP_LOGPROBS,
                                     "prompt_cache": _cache_request(info.cache_switch)},
                         "margins": "none (tokens only)" if self.tokens_only else
                         "none (sampled: the server's draws are unknown; top-1 holds the logprob of the token taken)"
                         if self.sampling is not None and not self.sampling.greedy else "top-1 minus top-2 logprob"},
            "versions": {"mgaudit": __version__},
        }

    def identity(self) -> dict[str, Any]:
        info, fp = self.info, self.info.fingerprint
        return {"backend": "endpoint", "url": info.base_url, "engine": info.engine, "model": info.model,
                "build": (fp.get("props") or {}).get("build_info"), "version": fp.get("version"),
                "slots": info.slots, "tokens_only": self.tokens_only,
                "tokenizer": (self.tokenizer_info or {}).get("name"), "route": self.route}

    def vocabulary(self) -> dict[str, Any]:
        size = self.info.vocab_size
        ids = self._run(self.client.tokenize(VOCAB_TEST))
        return {"size": size, "test_ids": ids}

    def context(self) -> int | None:
        return self.info.context

    def tokens_of(self, text: str) -> int | None:
        """How many tokens the server makes of ``text`` (None where it has no tokenize route)."""
        ids = self._run(self.client.tokenize(text))
        return None if ids is None else len(ids)

    def io(self) -> dict[str, Any]:
        """What the summary says about the answers: logprob precision and how token ids were had."""
        mapping = self._client.token_map.describe() if self._client is not None else None
        return {"logprob_precision": logprob_precision(self._values), "token_ids": mapping or "from the server",
                "retries": self._client.stats.retries if self._client is not None else 0}

    # ------------------------------------------------------------------ requests

    def spec(self, req: Request, settings: Settings, *, cache: bool | None = False, forced: Sequence[int] = (),
             max_tokens: int | None = None, prompt_logprobs: bool = False, seed: int | None = None) -> RequestSpec:
        body: dict[str, Any] = {"max_tokens": settings.max_new_tokens if max_tokens is None else max_tokens,
                                "temperature": 0, "stream": False}
        body.update(sampling_fields(settings, req, self.info.engine, seed))
        if self.info.model:
            body["model"] = self.info.model
        if req.ids is not None:
            path, body["prompt"] = "completions", list(req.ids) + list(forced)
        elif settings.chat:
            path, body["messages"] = "chat/completions", req.prompt.as_messages()
        else:
            path, body["prompt"] = "completions", req.prompt.as_text()
        if self.info.engine == "vllm":
            body["return_tokens_as_token_ids"] = True  # token strings come back as "token_id:N"
        if not self.tokens_only:
            if path == "completions":
                body["logprobs"] = TOP_LOGPROBS
            else:
                body["logprobs"], body["top_logprobs"] = True, TOP_LOGPROBS
        if prompt_logprobs:
            body["prompt_logprobs"] = TOP_LOGPROBS
        if cache is not None and self.info.supports_cache_prompt:
            body["cache_prompt"] = bool(cache)
        elif cache is False and self.info.cache_switch == "cache_salt":
            body["cache_salt"] = secrets.token_hex(8)  # a salt of its own: no cached prefix is read
        return RequestSpec(path, body)

    def _steps(self, c: Completion, sampled: bool = False, **meta: Any) -> Steps:
        self._values.extend(v for v in c.top1 + c.top2 if math.isfinite(v))
        n = len(c.tokens)
        # sampled: the server's draws are unknown, so no margin; top-1 holds the taken token's logprob
        top1, top2, runner = (c.token_logprobs or [math.nan] * n, [math.nan] * n, [-1] * n) if sampled else \
            (c.top1, c.top2, c.runner_up)
        return Steps(list(c.tokens), list(top1), list(top2), list(runner),
                     meta={"finish_reason": c.finish_reason, "seconds": round(c.seconds, 4), "attempts": c.attempts,
                           "cached_tokens": c.cached_tokens, "prompt_tokens": c.prompt_tokens,
                           "pieces": c.pieces, **meta}, alternatives=None if sampled else c.alternatives)

    async def _gather(self, specs: list[RequestSpec], spacing: float = 0.0) -> list[Completion]:
        async def send(k: int, spec: RequestSpec) -> Completion:
            if k and spacing:
                await asyncio.sleep(k * spacing)
            return await self.client.complete(spec)

        # every member runs to its end (no orphaned task logs an unretrieved error); then the first error
        results = await asyncio.gather(*(send(k, s) for k, s in enumerate(specs)), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return list(results)

    async def _posts(self, specs: list[RequestSpec]) -> list[tuple[dict[str, Any], int, float]]:
        return list(await asyncio.gather(*(self.client.post(s.path, s.body) for s in specs)))

    def one(self, request: Request, settings: Settings, keep_logits: bool = False, seed: int | None = None) -> Steps:
        """One request alone (``seed``: sampled with this seed instead of the prompt's draw seed)."""
        meta = _seed_meta(settings, request) if seed is None else {"draw_seed": seed}
        return self._steps(self._run(self.client.complete(self.spec(request, settings, seed=seed))),
                           not settings.sampling.greedy, **meta)

    def grouped(self, requests: Sequence[Request], condition: Condition, settings: Settings,
                references: Sequence[Steps] | None, on_done: Done | None) -> list[Steps]:
        if condition.kind == "warm-cache":  # each request twice, alone: the second finds its prompt cached
            return [self._warm(r, settings, on_done) for r in requests]
        spacing = (condition.spacing or 0.0) if condition.kind == "staggered" else 0.0
        t0 = time.perf_counter()
        comps = self._run(self._gather([self.spec(r, settings) for r in requests], spacing))
        seconds = time.perf_counter() - t0
        if on_done:
            on_done(len(requests))
        return [self._steps(c, not settings.sampling.greedy, group_seconds=round(seconds, 4),
                            **_seed_meta(settings, r)) for r, c in zip(requests, comps)]

    def _warm(self, request: Request, settings: Settings, on_done: Done | None) -> Steps:
        """The request sent twice, alone, the cache on: the second answer, with the prompt tokens it
        found cached (as the answer says, else as the server's cache-hit counter moved)."""
        spec = self.spec(request, settings, cache=True)
        prime = self._run(self.client.complete(spec))
        hits = self._run(self.client.cache_hits()) if self.info.engine == "vllm" else None
        warm = self._run(self.client.complete(spec))
        cached = warm.cached_tokens
        if cached is None and hits is not None:
            after = self._run(self.client.cache_hits())
            cached = None if after is None else int(after - hits)
        if on_done:
            on_done(1)
        return self._steps(warm, not settings.sampling.greedy, cached_tokens_prime=prime.cached_tokens,
                           cached_tokens=cached, **_seed_meta(settings, request))

    # ------------------------------------------------------------------ teacher forcing

    def scoring(self) -> dict[str, Any]:
        s = dict(self._scoring)
        s["requests_per_sequence"] = s["requests"] / s["sequences"] if s["sequences"] else None
        if s["route"] == "none" and "reason" not in s:
            s["reason"] = "no sequence needed it"
        if s["route"] != "none":
            s["note"] = ("steps after a divergence are scored on the reference's tokens processed as a prefill "
                         "(a server cannot be fed one token at a time): they carry the prefill's rounding")
        return s

    def forced(self, requests: Sequence[Request], condition: Condition, settings: Settings,
               references: Sequence[Steps], free: Sequence[Steps]) -> list[Steps]:
        """Teacher-forced steps of each request: the free-running steps up to and including its first
        divergence, then the server's scores of the reference's continuation (see the module doc).
        Where the prompts were not sent as token ids, nothing past the first divergence is scored."""
        out: list[Steps] = []
        pending: list[tuple[int, int]] = []  # (row, next step to score)
        for i, (ref, run) in enumerate(zip(references, free)):
            d = first_divergence(ref.tokens, run.tokens)
            if d is None or d >= len(ref):
                out.append(run.head(len(ref)))  # identical (or the reference ended first): nothing to score
                continue
            out.append(run.head(d + 1))
            if d + 1 < len(ref):
                pending.append((i, d + 1))
        if not pending:
            return out
        if not settings.sampling.greedy:
            self._scoring["reason"] = ("sampled: a server's draw at a step depends on its random stream, which a "
                                       "request continuing the reference's tokens does not resume")
            self._scoring["unscored_sequences"] = self._scoring.get("unscored_sequences", 0) + len(pending)
            return out
        if any(r.ids is None for r in requests) or self.tokens_only:
            self._scoring["reason"] = ("the prompts were sent as chat messages or text (no tokenizer): a server "
                                       "can be teacher-forced only on token ids" if not self.tokens_only else
                                       "tokens only: no logprobs to score with")
            self._scoring["unscored_sequences"] = self._scoring.get("unscored_sequences", 0) + len(pending)
            return out
        self._scoring["sequences"] += len(pending)
        if self._use_prompt_logprobs():
            pending = self._score_prompt_logprobs(requests, settings, references, out, pending)
        if pending:
            self._score_continuations(requests, settings, references, out, pending)
        return out

    def _used(self, route: str) -> None:
        if route not in self._routes:
            self._routes.append(route)
        self._scoring["route"] = " + ".join(self._routes)

    def _use_prompt_logprobs(self) -> bool:
        if self._prompt_logprobs is None:
            self._prompt_logprobs = self.info.engine == "vllm"
        return self._prompt_logprobs

    def _score_prompt_logprobs(self, requests, settings, references, out, pending) -> list[tuple[int, int]]:
        """vLLM: the whole reference continuation scored in one request per sequence."""
        specs = [self.spec(requests[i], settings, forced=references[i].tokens, max_tokens=1, prompt_logprobs=True)
                 for i, _ in pending]
        answers = self._run(self._posts(specs))
        self._scoring["requests"] += len(specs)
        left = []
        for (i, start), (answer, _, _) in zip(pending, answers):
            scored = prompt_logprob_steps(answer, len(requests[i].ids), len(references[i]))
            if scored is None:  # this server ignores prompt_logprobs: score by continuations instead
                self._prompt_logprobs = False
                left.append((i, start))
                continue
            self._values.extend(v for v in scored.top1 + scored.top2 if math.isfinite(v))
            out[i].extend(scored, start)
            self._used("prompt-logprobs")
        return left

    def _score_continuations(self, requests, settings, references, out, pending) -> None:
        """Continue each sequence from the reference's prefix until the server parts from it again."""
        self._used("continuation")
        while pending:
            specs = [self.spec(requests[i], settings, forced=references[i].tokens[:p],
                               max_tokens=len(references[i]) - p) for i, p in pending]
            comps = self._run(self._gather(specs))
            self._scoring["requests"] += len(specs)
            nxt = []
            for (i, p), c in zip(pending, comps):
                ref, got = references[i], self._steps(c)
                m = first_divergence(ref.tokens[p:p + len(got)], got.tokens)
                if m is None:  # agreed to its end: done (a shorter answer leaves the rest unscored)
                    out[i].extend(got, 0)
                    continue
                out[i].extend(got, 0, m + 1)
                if p + m + 1 < len(ref) and m < len(got):
                    nxt.append((i, p + m + 1))
            pending = nxt


def sampling_fields(settings: Settings, req: Request, engine: str | None, seed: int | None = None) -> dict[str, Any]:
    """The sampling fields of a request (nothing when greedy): every parameter explicitly, the
    prompt's draw seed (or ``seed``) as ``seed``; ``top_k``/``min_p`` where given, and always on
    llama.cpp (its defaults, top-k 40 and min-p 0.05, would apply otherwise)."""
    s = settings.sampling
    if s.greedy:
        return {}
    out: dict[str, Any] = {"temperature": s.temperature, "top_p": s.top_p,
                           "seed": settings.draw_seed(req) if seed is None else seed}
    if s.top_k is not None or engine == "llama.cpp":
        out["top_k"] = s.top_k or 0
    if s.min_p > 0 or engine == "llama.cpp":
        out["min_p"] = s.min_p
    return out


def _request_sampling(sampling, engine: str | None) -> dict[str, Any]:
    """What the provenance says about the sampling fields sent."""
    if sampling is None or sampling.greedy:
        return {"temperature": 0}
    fields = sampling_fields(Settings(1, sampling=sampling), None, engine, seed=-1)
    fields["seed"] = "each prompt's draw seed (from the sample seed and the prompt id)"
    return fields


def _seed_meta(settings: Settings, req: Request) -> dict[str, Any]:
    seed = settings.draw_seed(req)
    return {} if seed is None else {"draw_seed": seed}


def prompt_logprob_steps(answer: dict[str, Any], prompt_len: int, steps: int) -> Steps | None:
    """vLLM's ``choices[0].prompt_logprobs`` for the positions after a prompt of ``prompt_len`` tokens:
    per step, the server's top-1 and top-2 (ids and logprobs). None where the answer has none."""
    try:
        entries = answer["choices"][0]["prompt_logprobs"]
    except (KeyError, IndexError, TypeError):
        return None
    if not isinstance(entries, list) or len(entries) < prompt_len + steps:
        return None
    out = Steps(alternatives=[])
    for t in range(steps):
        e = entries[prompt_len + t]
        if not isinstance(e, dict) or not e:
            raise EndpointError(f"prompt_logprobs[{prompt_len + t}] is empty: cannot score step {t}")
        # the top-k by rank (the token actually in the prompt is listed too, with its rank, even when lower)
        ranked = sorted(((int(k), v) for k, v in e.items()), key=lambda kv: (kv[1].get("rank", 1 << 30),
                                                                            -kv[1].get("logprob", -math.inf)))
        listed = [(i, float(v.get("logprob", math.nan))) for i, v in ranked if v.get("rank", 1 << 30) <= TOP_LOGPROBS]
        listed = listed or [(ranked[0][0], float(ranked[0][1].get("logprob", math.nan)))]
        out.tokens.append(listed[0][0])
        out.top1.append(listed[0][1])
        out.runner_up.append(listed[1][0] if len(listed) > 1 else -1)
        out.top2.append(listed[1][1] if len(listed) > 1 else math.nan)
        out.alternatives.append(listed)
    return out


def _cache_request(switch: str | None) -> str:
    """How requests set the prompt cache, in words (the provenance)."""
    if switch == "cache_prompt":
        return "cache_prompt false (cold) alone, in flight and staggered; true for the warm cache"
    if switch == "cache_salt":
        return "a cache_salt of its own per request (cold) alone, in flight and staggered; none for the warm cache"
    return "not exposed by this server"


async def _identify(url: str, timeout: float) -> ServerInfo:
    async with EndpointClient(url, concurrency=1, timeout=timeout, retries=0) as c:
        return await c.identify()


def identify(url: str, timeout: float = 10.0) -> ServerInfo:
    """Reach a server and fingerprint it; EndpointError within a few seconds where it is not there."""
    return asyncio.run(_identify(url, timeout))
