"""Reference runs, decoded once per (backend identity, request, settings) and reused.

Comparing three servers (or three policies) with one reference decodes the reference once:
each run is stored as JSON under ``$MGAUDIT_CACHE/references/<identity>/<request>.json``
(atomic writes). The identity is everything the run depends on (for the local model: its
weights, dtype, device, attention, torch and transformers versions, the machine and its
threads, mgaudit's version; for a server: its fingerprint); the settings are the decoding
settings. A backend says whether its reference runs may be cached at all (a server's solo
answers are part of what its own audit measures, so they are cached only where the server
is named as the reference of another backend).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..formats.files import atomic_write_json
from .steps import Request, Settings, Steps

FORMAT = "mgaudit.reference-run"
VERSION = 3  # 2: the best tokens of each step (alternatives); 3: 20 of them for the local model


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


class ReferenceCache:
    """``get``/``put`` reference runs of one backend identity (``root=None``: a cache that keeps
    nothing)."""

    def __init__(self, root: Path | None, identity: dict[str, Any], settings: Settings):
        self.identity_key = _digest(identity)[:24]
        self.folder = None if root is None else Path(root) / "references" / self.identity_key
        self.settings = settings
        self.hits = 0
        self.stored = 0

    def _path(self, req: Request) -> Path | None:
        if self.folder is None:
            return None
        return self.folder / f"{_digest([req.digest(self.settings.chat), self.settings.key()])[:32]}.json"

    def get(self, req: Request) -> Steps | None:
        path = self._path(req)
        if path is None or not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # unreadable: decode again (and overwrite it)
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            return None
        self.hits += 1
        steps = Steps.from_json(data["steps"])
        steps.meta["from_cache"] = data.get("created")
        return steps

    def put(self, req: Request, steps: Steps) -> None:
        path = self._path(req)
        if path is None:
            return
        from ..formats.provenance import now

        meta = {k: v for k, v in steps.meta.items() if k != "from_cache"}
        atomic_write_json(path, {"format": FORMAT, "version": VERSION, "created": now(), "prompt_id": req.id,
                                 "steps": {**Steps(steps.tokens, steps.top1, steps.top2, steps.runner_up,
                                                   meta=meta, kind=steps.kind).to_json()}})
        self.stored += 1

    def describe(self) -> dict[str, Any]:
        return {"enabled": self.folder is not None, "folder": None if self.folder is None else str(self.folder),
                "hits": self.hits, "stored": self.stored}


class ReferenceRuns:
    """The reference runs of a job, each decoded at most once: from memory, from runs read back
    (a resumed scan's ``trace-solo`` files), from the cache, or decoded by the backend alone.
    ``keep_logits``: the candidate's comparison needs the reference's logits (a local padded
    batch records the largest logit difference): those runs are decoded afresh."""

    def __init__(self, backend, settings: Settings, cache_root: Path | None,
                 read_back: dict[int, Steps] | None = None):
        self.backend, self.settings = backend, settings
        root = cache_root if backend.cache_references else None
        self.cache = ReferenceCache(root, backend.identity(), settings)
        self.runs: dict[int, Steps] = dict(read_back or {})
        self.decoded = 0

    def get(self, requests, *, keep_logits: bool = False, on_done=None) -> list[Steps]:
        todo = [r for r in requests if r.index not in self.runs
                or (keep_logits and self.runs[r.index].logits is None)]
        if not keep_logits:
            for r in list(todo):
                hit = self.cache.get(r)
                if hit is not None:
                    self.runs[r.index] = hit
                    todo.remove(r)
                    if on_done:
                        on_done(1)
        if todo:
            for r, run in zip(todo, self.backend.alone(todo, self.settings, keep_logits=keep_logits,
                                                       on_done=on_done)):
                self.runs[r.index] = run
                self.cache.put(r, run)
                self.decoded += 1
        return [self.runs[r.index] for r in requests]

    def describe(self) -> dict[str, Any]:
        return {"decoded": self.decoded, "cache": self.cache.describe()}
