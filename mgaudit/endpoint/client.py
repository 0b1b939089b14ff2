"""An asynchronous client for OpenAI-compatible completion servers, with what an audit needs.

One :class:`EndpointClient` holds one ``httpx.AsyncClient`` with a bounded
connection pool and timeouts. It

* identifies the server (:meth:`EndpointClient.identify`): is it reachable, which model
  does it serve, and what identifies the engine (``/props`` of llama.cpp,
  ``/version`` of vLLM, ``/info`` of TGI, ``/get_server_info`` of SGLang, the
  ``Server`` and version headers);
* sends one greedy completion (:meth:`EndpointClient.complete`) with top-2
  logprobs and parses the answer into a :class:`Completion`: per step the chosen
  token id, the top-1/top-2 token ids and logprobs, the finish reason and the
  server's usage figures.

Answers are read by :mod:`.answers`. Errors are :class:`EndpointError` (an :class:`~mgaudit.errors.InputError`, exit
code 2). Messages never carry the API key.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

from ..errors import UsageError
from .answers import Completion, EndpointError, TokenMap, parse_choice, taken_logprobs, token_pieces

#: Environment variables read for the API key, first match wins.
API_KEY_ENV = ("MGAUDIT_API_KEY", "OPENAI_API_KEY")
#: HTTP statuses worth another attempt.
RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


@dataclass
class ServerInfo:
    """What identifying the server told: the model to name in requests and the engine fingerprint."""

    base_url: str
    root_url: str
    model: str | None
    engine: str
    fingerprint: dict[str, Any]
    slots: int | None = None
    supports_cache_prompt: bool = False
    vocab_size: int | None = None  # where the server says (llama.cpp's /v1/models meta.n_vocab)
    context: int | None = None  # tokens per sequence it takes (vLLM's max_model_len, llama.cpp's n_ctx per slot)
    #: the prompt cache where the server tells: ``enabled``, ``block_size`` (tokens; only full blocks are
    #: reused) and ``switch``, the request field that keeps a request off it (``cache_prompt``, ``cache_salt``)
    prefix_cache: dict[str, Any] | None = None

    @property
    def cache_switch(self) -> str | None:
        return (self.prefix_cache or {}).get("switch")

    def summary(self) -> dict[str, Any]:
        """The engine in a few fields (a card's fingerprint): name and version from its info routes,
        sequences decoded together and the prefix cache where it says, the model it serves."""
        fp = self.fingerprint
        props = fp.get("props") or {}
        data = ((fp.get("models") or {}).get("data") or [{}])[0] if isinstance(fp.get("models"), dict) else {}
        version = next((v.get("version") for v in (fp.get("version"), fp.get("info"), fp.get("get_server_info"))
                        if isinstance(v, dict) and v.get("version")), None)
        return {"engine": self.engine, "version": version, "build": props.get("build_info"), "url": self.base_url,
                "model": self.model, "model_path": props.get("model_path") or (data or {}).get("root"),
                "context_per_sequence": self.context, "slots": self.slots, "prefix_cache": self.prefix_cache,
                "chat_template_sha256": props.get("chat_template_sha256"), "scheduler": fp.get("scheduler"),
                "server_header": (fp.get("headers") or {}).get("server")}


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

    async def identify(self) -> ServerInfo:
        """Is the server there; which model; what engine. Raises EndpointError within a few seconds."""
        r = await self._models()
        models = r.json()
        data = models.get("data") if isinstance(models, dict) else None
        entries = [m for m in data if isinstance(m, dict)] if isinstance(data, list) else []
        first = entries[0] if entries else {}
        meta = first.get("meta") if isinstance(first.get("meta"), dict) else {}
        fp: dict[str, Any] = {
            "base_url": self.base_url,
            "models": _slim(models),
            "headers": _engine_headers(dict(r.headers)),
            "api_key": f"from ${self.api_key_env}" if self.api_key_env else None,
        }
        info = ServerInfo(self.base_url, self.root_url, entries[0].get("id") if entries else None, "unknown", fp,
                          vocab_size=_int(meta.get("n_vocab")), context=_int(first.get("max_model_len")))
        if not await self._llama_cpp(info):
            await self._other_engines(info)
        fp["engine"], fp["prefix_cache"] = info.engine, info.prefix_cache
        return info

    async def _models(self):
        """GET /models, with one-line errors for the ways it fails."""
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
            r.json()
        except ValueError:
            raise EndpointError(f"GET {url} did not return JSON",
                                hint="give the base URL of an OpenAI-compatible server") from None
        return r

    async def _llama_cpp(self, info: ServerInfo) -> bool:
        """llama.cpp's ``/props``: slots, build, context per slot, the prompt-cache switch."""
        st, props, h = await self._get_json(f"{self.root_url}/props")
        if not (st == 200 and isinstance(props, dict) and ("build_info" in props or "total_slots" in props)):
            return False
        info.fingerprint["props"] = fp = _llama_props(props)
        info.engine, info.slots, info.supports_cache_prompt = "llama.cpp", _int(fp["total_slots"]), True
        info.context = _int(fp["n_ctx"]) or info.context
        info.prefix_cache = {"enabled": True, "block_size": None, "switch": "cache_prompt",
                             "note": "per request: cache_prompt (on by default) reuses a slot's earlier prompt"}
        info.fingerprint["headers"].update(_engine_headers(h))
        return True

    async def _other_engines(self, info: ServerInfo) -> None:
        """vLLM's ``/version``, TGI's ``/info``, SGLang's ``/get_server_info``: the first that answers names it."""
        for path, name in (("/version", "vllm"), ("/info", "tgi"), ("/get_server_info", "sglang")):
            st, body, h = await self._get_json(f"{self.root_url}{path}", timeout=2.0)
            if st == 200 and isinstance(body, dict):
                info.fingerprint[path.strip("/")] = _slim(body)
                info.fingerprint["headers"].update(_engine_headers(h))
                if info.engine == "unknown" and (name != "tgi" or "model_id" in body):
                    info.engine = name
        if info.engine == "vllm":
            info.slots, info.prefix_cache = await self._vllm_config(info.fingerprint)
        elif info.engine == "sglang":  # its server arguments (documented; not tried against a running server here)
            args = info.fingerprint.get("get_server_info") or {}
            info.slots = _int(args.get("max_running_requests"))
            if isinstance(args.get("disable_radix_cache"), bool):
                info.prefix_cache = {"enabled": not args["disable_radix_cache"], "block_size": None, "switch": None,
                                     "from": "/get_server_info disable_radix_cache"}

    async def _vllm_config(self, fp: dict[str, Any]) -> tuple[int | None, dict[str, Any] | None]:
        """vLLM's sequence limit and prefix cache: ``/metrics`` (``vllm:cache_config_info``) always;
        ``max_num_seqs`` only where ``/server_info`` answers (``VLLM_SERVER_DEV_MODE=1``)."""
        text = await self._get_text(f"{self.root_url}/metrics")
        labels = prometheus_labels(text or "", "vllm:cache_config_info")
        cache = None
        if labels:
            enabled = labels.get("enable_prefix_caching") == "True"
            block = labels.get("block_size")
            cache = {"enabled": enabled, "block_size": int(block) if block and block.isdigit() else None,
                     "switch": "cache_salt" if enabled else None, "from": "/metrics vllm:cache_config_info"}
            fp["cache_config"] = {k: labels.get(k) for k in ("block_size", "enable_prefix_caching",
                                                             "kv_cache_size_tokens", "cache_dtype")}
        st, info, _ = await self._get_json(f"{self.root_url}/server_info?config_format=json", timeout=2.0)
        seqs = None
        if st == 200 and isinstance(info, dict):
            sched = ((info.get("vllm_config") or {}).get("scheduler_config") or {})
            seqs = sched.get("max_num_seqs") if isinstance(sched.get("max_num_seqs"), int) else None
            fp["scheduler"] = {k: sched.get(k) for k in ("max_num_seqs", "max_num_batched_tokens",
                                                         "enable_chunked_prefill", "policy")}
            fp["batch_invariant"] = ((info.get("vllm_env") or {}).get("VLLM_BATCH_INVARIANT"))
        return seqs, cache

    async def _get_text(self, url: str, timeout: float = 4.0) -> str | None:
        import httpx

        try:
            r = await self._client.get(url, timeout=httpx.Timeout(timeout, connect=min(timeout, self.connect_timeout)))
        except httpx.HTTPError:
            return None
        return r.text if r.status_code == 200 else None

    async def cache_hits(self) -> float | None:
        """vLLM's prompt tokens found in its prefix cache so far (``vllm:prefix_cache_hits_total``)."""
        text = await self._get_text(f"{self.root_url}/metrics")
        return prometheus_total(text, "vllm:prefix_cache_hits_total") if text else None

    async def tokenize(self, text: str) -> list[int] | None:
        """The server's token ids of ``text`` without special tokens (llama.cpp's and vLLM's
        ``/tokenize``); None where the server has no such route."""
        import httpx

        for body in ({"content": text, "add_special": False}, {"prompt": text, "add_special_tokens": False}):
            try:
                r = await self._client.post(f"{self.root_url}/tokenize", json=body, timeout=httpx.Timeout(10.0))
            except httpx.HTTPError:
                return None
            if r.status_code == 404:
                return None
            if r.status_code != 200:
                continue
            try:
                tokens = r.json().get("tokens")
            except (ValueError, AttributeError):
                continue
            if isinstance(tokens, list) and all(isinstance(t, int) for t in tokens):
                return tokens
            if isinstance(tokens, list) and all(isinstance(t, dict) and isinstance(t.get("id"), int) for t in tokens):
                return [t["id"] for t in tokens]
        return None

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
        steps = parse_choice(choice, self.tokens_only, self.token_map, self.text_to_ids)
        text = choice.get("text")
        if text is None:
            text = (choice.get("message") or {}).get("content") or ""
        usage = answer.get("usage") or {}
        details = usage.get("prompt_tokens_details") or {}
        return Completion(steps.tokens, steps.top1, steps.top2, steps.runner_up, text, choice.get("finish_reason"),
                          seconds, attempts, details.get("cached_tokens") if isinstance(details, dict) else None,
                          usage.get("prompt_tokens"), started, token_pieces(choice), steps.alternatives,
                          taken_logprobs(choice))


def _int(x: Any) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) else None


def _llama_props(props: dict[str, Any]) -> dict[str, Any]:
    """What identifies a llama.cpp server in its ``/props``."""
    dgs = props.get("default_generation_settings") or {}
    template = props.get("chat_template")
    return {"build_info": props.get("build_info"), "total_slots": props.get("total_slots"),
            "model_path": props.get("model_path"), "n_ctx": dgs.get("n_ctx"),
            "chat_template_sha256": hashlib.sha256(str(template).encode()).hexdigest() if template else None,
            "modalities": props.get("modalities")}


def prometheus_labels(text: str, name: str) -> dict[str, str] | None:
    """The labels of the first sample of metric ``name`` in Prometheus text (None where absent)."""
    for line in text.splitlines():
        if line.startswith(name + "{"):
            body = line[len(name) + 1: line.rfind("}")]
            return dict(re.findall(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"', body))
    return None


def prometheus_total(text: str, name: str) -> float | None:
    """The sum of every sample of metric ``name`` in Prometheus text (None where absent)."""
    values = [float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)]
    return sum(values) if values else None


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
