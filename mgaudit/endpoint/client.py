"""An asynchronous client for OpenAI-compatible completion servers, with what an audit needs.

One :class:`EndpointClient` holds one ``httpx.AsyncClient`` with a bounded
connection pool and timeouts. It

* probes the server (:meth:`EndpointClient.probe`): is it reachable, which model
  does it serve, and what identifies the engine (``/props`` of llama.cpp,
  ``/version`` of vLLM, ``/info`` of TGI, ``/get_server_info`` of SGLang, the
  ``Server`` and version headers);
* sends one greedy completion (:meth:`EndpointClient.complete`) with top-2
  logprobs and parses the answer into a :class:`Completion`: per step the chosen
  token id, the top-1/top-2 token ids and logprobs, the finish reason and the
  server's usage figures.

The margin of a step is top-1 logprob minus top-2 logprob. Both logprobs share the
softmax normaliser, so this is the logit margin.

Two answer shapes are read: ``logprobs.content[i]`` with ``top_logprobs`` lists
(llama.cpp, OpenAI chat, vLLM chat) and the legacy completions shape
``logprobs.tokens / token_logprobs / top_logprobs`` (OpenAI, vLLM completions).
Where a server gives token strings but no ids, a :class:`TokenMap` turns strings
into ids (through a tokenizer when one is given) and the result says so.

Errors are :class:`EndpointError` (an :class:`~mgaudit.errors.InputError`, exit
code 2). Messages never carry the API key.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

from ..errors import InputError, UsageError

#: Environment variables read for the API key, first match wins.
API_KEY_ENV = ("MGAUDIT_API_KEY", "OPENAI_API_KEY")
#: HTTP statuses worth another attempt.
RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
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

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def margins(self) -> list[float]:
        return [a - b for a, b in zip(self.top1, self.top2)]


@dataclass
class ServerInfo:
    """What the probe learned: the model to name in requests and the engine fingerprint."""

    base_url: str
    root_url: str
    model: str | None
    engine: str
    fingerprint: dict[str, Any]
    slots: int | None = None
    supports_cache_prompt: bool = False


def normalize_base_url(url: str) -> tuple[str, str]:
    """(base URL ending in /v1 or the given path, root URL without /v1). Raises UsageError."""
    text = (url or "").strip()
    if not text:
        raise UsageError("the endpoint URL is empty", hint="give a base URL such as http://127.0.0.1:8080/v1")
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"endpoint {url!r} is not an http(s) URL",
                         hint="give a base URL such as http://127.0.0.1:8080/v1")
    path = parts.path.rstrip("/")
    if not path:
        path = "/v1"
    base = urlunsplit((parts.scheme, parts.netloc, path, "", ""))
    root_path = path[: -len("/v1")] if path.endswith("/v1") else path
    root = urlunsplit((parts.scheme, parts.netloc, root_path, "", ""))
    return base, root


def api_key_from_env() -> tuple[str | None, str | None]:
    """(key, name of the variable it came from); (None, None) where none is set."""
    for name in API_KEY_ENV:
        value = os.environ.get(name)
        if value:
            return value, name
    return None, None


def _short(text: str, n: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


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


def parse_choice(choice: dict[str, Any], tokens_only: bool, token_map: TokenMap,
                 text_to_ids: Callable[[str], list[int]] | None) -> tuple[list[int], list[float], list[float], list[int]]:
    """Steps of one answer choice: (token ids, top1, top2, runner-up ids)."""
    lp = choice.get("logprobs")
    if lp is None or lp == {}:
        if not tokens_only:
            raise NoLogprobsError("the server returned no logprobs (field choices[0].logprobs is missing or null)",
                                  hint="audit tokens only, without margins, or enable logprobs on the server")
        text = choice.get("text")
        if text is None:
            text = (choice.get("message") or {}).get("content") or ""
        ids = text_to_ids(text) if text_to_ids else list(text.encode("utf-8"))
        nan = [math.nan] * len(ids)
        return ids, nan, list(nan), [-1] * len(ids)
    if not isinstance(lp, dict):
        raise EndpointError(f"choices[0].logprobs has an unknown shape ({type(lp).__name__})")
    ids: list[int] = []
    top1: list[float] = []
    top2: list[float] = []
    runner: list[int] = []
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
            if not cands and not tokens_only:
                raise NoLogprobsError(f"the server returned no top_logprobs (choices[0].logprobs.content[{k}]"
                                      ".top_logprobs is empty)",
                                      hint="audit tokens only, without margins, or enable top logprobs on the server")
            t1, t2, ru = _top_two(cands, chosen)
            ids.append(chosen)
            top1.append(t1)
            top2.append(t2)
            runner.append(ru)
    elif isinstance(lp.get("tokens"), list):
        tops = lp.get("top_logprobs") or []
        for k, tok in enumerate(lp["tokens"]):
            chosen = token_map.id_of(str(tok))
            cand_d = tops[k] if k < len(tops) and isinstance(tops[k], dict) else {}
            if not cand_d and not tokens_only:
                raise NoLogprobsError(f"the server returned no top_logprobs (choices[0].logprobs.top_logprobs[{k}])",
                                      hint="audit tokens only, without margins, or enable top logprobs on the server")
            cands = [(token_map.id_of(str(s)), _fnum(v)) for s, v in cand_d.items()]
            t1, t2, ru = _top_two(cands, chosen)
            ids.append(chosen)
            top1.append(t1)
            top2.append(t2)
            runner.append(ru)
    else:
        raise NoLogprobsError("choices[0].logprobs holds neither content nor tokens",
                              hint="audit tokens only, without margins")
    if tokens_only:
        top1 = [math.nan] * len(ids)
        top2 = [math.nan] * len(ids)
        runner = [-1] * len(ids)
    return ids, top1, top2, runner


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


# --------------------------------------------------------------------------- the client


@dataclass
class RequestSpec:
    """One request: the path (``completions`` or ``chat/completions``) and the JSON body."""

    path: str
    body: dict[str, Any]


@dataclass
class ClientStats:
    requests: int = 0
    retries: int = 0
    errors: list[str] = field(default_factory=list)


class EndpointClient:
    """Async client; use ``async with EndpointClient(url, ...) as c``."""

    def __init__(self, url: str, *, concurrency: int = 16, timeout: float = 120.0, connect_timeout: float = 3.0,
                 retries: int = 3, backoff: float = 0.5, tokens_only: bool = False,
                 token_map: TokenMap | None = None, text_to_ids: Callable[[str], list[int]] | None = None):
        self.base_url, self.root_url = normalize_base_url(url)
        self.concurrency = max(1, int(concurrency))
        self.timeout = float(timeout)
        self.connect_timeout = float(connect_timeout)
        self.retries = max(0, int(retries))
        self.backoff = float(backoff)
        self.tokens_only = tokens_only
        self.token_map = token_map or TokenMap(None)
        self.text_to_ids = text_to_ids
        self.api_key, self.api_key_env = api_key_from_env()
        self.stats = ClientStats()
        self._client = None

    async def __aenter__(self) -> "EndpointClient":
        import httpx

        headers = {"Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        self._client = httpx.AsyncClient(
            headers=headers,
            limits=httpx.Limits(max_connections=self.concurrency + 2, max_keepalive_connections=self.concurrency + 2),
            timeout=httpx.Timeout(self.timeout, connect=self.connect_timeout),
        )
        return self

    async def __aexit__(self, *exc) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # ----------------------------------------------------------------- probing

    async def _get_json(self, url: str, timeout: float = 4.0) -> tuple[int | None, Any, dict[str, str]]:
        import httpx

        try:
            r = await self._client.get(url, timeout=httpx.Timeout(timeout, connect=min(timeout, self.connect_timeout)))
        except httpx.HTTPError:
            return None, None, {}
        try:
            body = r.json()
        except ValueError:
            body = None
        return r.status_code, body, dict(r.headers)

    async def probe(self) -> ServerInfo:
        """Is the server there; which model; what engine. Raises EndpointError within a few seconds."""
        import httpx

        url = f"{self.base_url}/models"
        try:
            r = await self._client.get(url, timeout=httpx.Timeout(4.0, connect=min(3.0, self.connect_timeout)))
        except httpx.ConnectError as exc:
            raise EndpointError(f"cannot reach the server at {self.base_url}: {_short(exc) or 'connection failed'}",
                                hint="check the URL and that the server is running") from None
        except httpx.TimeoutException:
            raise EndpointError(f"the server at {self.base_url} did not answer GET /models within 4 s",
                                hint="check the URL and that the server is running") from None
        except httpx.HTTPError as exc:
            raise EndpointError(f"GET {url} failed: {exc.__class__.__name__}: {_short(exc)}") from None
        if r.status_code in (401, 403):
            raise EndpointError(f"GET {url}: HTTP {r.status_code}: the server wants an API key",
                                hint=f"set {' or '.join(API_KEY_ENV)}")
        if r.status_code == 404:
            raise EndpointError(f"GET {url}: HTTP 404: not an OpenAI-compatible base URL",
                                hint="give the base URL that ends in /v1, e.g. http://127.0.0.1:8080/v1")
        if r.status_code >= 400:
            raise EndpointError(f"GET {url}: HTTP {r.status_code}: {_short(r.text)}")
        try:
            models = r.json()
        except ValueError:
            raise EndpointError(f"GET {url} did not return JSON",
                                hint="give the base URL of an OpenAI-compatible server") from None
        data = models.get("data") if isinstance(models, dict) else None
        model_ids = [m.get("id") for m in data if isinstance(m, dict)] if isinstance(data, list) else []
        fp: dict[str, Any] = {
            "base_url": self.base_url,
            "models": _slim(models),
            "headers": _engine_headers(dict(r.headers)),
            "api_key": f"from ${self.api_key_env}" if self.api_key_env else None,
        }
        engine = "unknown"
        slots = None
        cache_prompt = False
        st, props, h = await self._get_json(f"{self.root_url}/props")
        if st == 200 and isinstance(props, dict) and ("build_info" in props or "total_slots" in props):
            engine = "llama.cpp"
            slots = props.get("total_slots")
            cache_prompt = True
            dgs = props.get("default_generation_settings") or {}
            fp["props"] = {
                "build_info": props.get("build_info"),
                "total_slots": slots,
                "model_path": props.get("model_path"),
                "n_ctx": dgs.get("n_ctx"),
                "chat_template_sha256": hashlib.sha256(str(props.get("chat_template", "")).encode()).hexdigest()
                if props.get("chat_template") else None,
                "modalities": props.get("modalities"),
            }
            fp["headers"].update(_engine_headers(h))
        else:
            for path, name in (("/version", "vllm"), ("/info", "tgi"), ("/get_server_info", "sglang")):
                st, body, h = await self._get_json(f"{self.root_url}{path}", timeout=2.0)
                if st == 200 and isinstance(body, dict):
                    fp[path.strip("/")] = _slim(body)
                    fp["headers"].update(_engine_headers(h))
                    if engine == "unknown":
                        engine = name
                        if name == "tgi" and "model_id" not in body:
                            engine = "unknown"
        fp["engine"] = engine
        return ServerInfo(self.base_url, self.root_url, model_ids[0] if model_ids else None, engine, fp,
                          slots if isinstance(slots, int) else None, cache_prompt)

    # ----------------------------------------------------------------- completions

    async def post(self, path: str, body: dict[str, Any]) -> tuple[dict[str, Any], int, float]:
        """POST with bounded retries: (JSON answer, attempts, seconds of the successful attempt)."""
        import httpx

        url = f"{self.base_url}/{path}"
        last = ""
        for attempt in range(1, self.retries + 2):
            t0 = time.perf_counter()
            try:
                r = await self._client.post(url, json=body)
            except httpx.TimeoutException:
                last = f"no answer within {self.timeout:g} s"
            except httpx.TransportError as exc:
                last = f"{exc.__class__.__name__}: {_short(exc) or 'transport error'}"
            else:
                if r.status_code == 200:
                    try:
                        return r.json(), attempt, time.perf_counter() - t0
                    except ValueError:
                        last = "the answer is not JSON"
                elif r.status_code in RETRY_STATUS:
                    last = f"HTTP {r.status_code}: {_short(r.text)}"
                else:
                    raise EndpointError(f"POST {url}: HTTP {r.status_code}: {_short(r.text)}")
            self.stats.retries += attempt <= self.retries
            if attempt <= self.retries:
                await asyncio.sleep(self.backoff * (2 ** (attempt - 1)))
        raise EndpointError(f"POST {url} failed after {self.retries + 1} attempts: {last}",
                            hint="the results written so far are complete; resume when the server is healthy")

    async def complete(self, spec: RequestSpec) -> Completion:
        started = time.perf_counter()
        answer, attempts, seconds = await self.post(spec.path, spec.body)
        self.stats.requests += 1
        choices = answer.get("choices") if isinstance(answer, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise EndpointError(f"POST {self.base_url}/{spec.path}: the answer has no choices[0]")
        choice = choices[0]
        ids, t1, t2, ru = parse_choice(choice, self.tokens_only, self.token_map, self.text_to_ids)
        text = choice.get("text")
        if text is None:
            text = (choice.get("message") or {}).get("content") or ""
        usage = answer.get("usage") or {}
        details = usage.get("prompt_tokens_details") or {}
        return Completion(ids, t1, t2, ru, text, choice.get("finish_reason"), seconds, attempts,
                          details.get("cached_tokens") if isinstance(details, dict) else None,
                          usage.get("prompt_tokens"), started, token_pieces(choice))


def _engine_headers(headers: dict[str, str]) -> dict[str, str]:
    keep = {}
    for k, v in headers.items():
        lk = k.lower()
        if lk == "server" or "version" in lk or lk.startswith("x-engine") or lk in ("x-compute-type",):
            keep[lk] = v
    return keep


def _slim(obj: Any, depth: int = 0) -> Any:
    """A bounded copy of a JSON answer for provenance: long strings hashed, depth limited."""
    if depth > 4:
        return "..."
    if isinstance(obj, dict):
        return {str(k): _slim(v, depth + 1) for k, v in list(obj.items())[:40]}
    if isinstance(obj, list):
        return [_slim(v, depth + 1) for v in obj[:20]]
    if isinstance(obj, str) and len(obj) > 300:
        return f"<{len(obj)} chars, sha256 {hashlib.sha256(obj.encode()).hexdigest()[:16]}>"
    return obj
