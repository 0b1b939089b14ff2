"""A server's determinism sweep (``scan --sweep``): where batching starts to change its answers,
along each axis that matters in production, planned as conditions and units of the audit core.

Axes, each a set of :mod:`.conditions` run ``rounds`` times (each round draws its groups anew):

* ``concurrency``: 2, 4, 8, ... up to ``max_concurrency`` requests sent together (``in-flight``);
  level 1 is each request alone. Between the last identical and the first differing level the
  sweep bisects until the two are adjacent, so the onset is located to the level;
* ``staggered``: the same levels with the requests arriving one after another (``staggered``),
  each joining a batch that is already decoding, as continuous batching admits them;
* ``cache``: each request alone with its prompt cache cold (``alone``) and warm (``warm-cache``);
* ``depth``: the prompts behind a context of ``long_prompt_tokens`` tokens (variant ``long``),
  alone and at the top level (and with a warm cache where the cache axis runs: a prefix cache of
  fixed-size blocks reuses nothing of a short prompt); the token position of every divergence is
  in the card for every axis;
* ``route``: the prompts through the server's own chat template (variant ``chat``) besides token
  ids through ``completions``, where mgaudit has a tokenizer.

Repetition: level 1 is the same request alone again, once per round, which tells run-to-run
differences from batch-to-batch ones; the card shows each level's spread across rounds.

The plan is a function of the options and of the unit files written so far (which levels
differed, how long a request alone took), so a resumed sweep plans the same units, skips the
ones done and ends in the same card. The card itself: :meth:`Sweep.card`.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import UsageError
from ..prompts import Prompt
from . import outcomes
from .conditions import Condition, batch_groups
from .steps import Request, Settings
from .tracedir import Unit, unit_name

AXES = ("concurrency", "staggered", "cache", "depth", "route")
#: The top level where neither ``max_concurrency`` nor the server's slots say.
DEFAULT_TOP = 64
#: The most requests in flight a sweep sends (the client's connections).
MAX_TOP = 256
#: Requests per unit file of single requests (reference runs, alone, warm cache).
CHUNK = 8
LONG, CHAT = "long", "chat"
VARIANTS = {"": "prompts as given", LONG: "long prompts", CHAT: "chat template (server)"}
#: The condition each arrival of the concurrency axis runs, by series name.
ARRIVALS = {"together": "in-flight", "staggered": "staggered"}
LONG_INTRO = "Background notes (not all of them matter here):\n\n"
LONG_QUESTION = "\n\nNow the question:\n\n"


@dataclass
class SweepSpec:
    """What a sweep covers: ``rounds`` per condition, levels up to ``max_concurrency`` (None: the
    server's slots where it says, else :data:`DEFAULT_TOP`), the ``axes`` run, and the context of
    the depth axis' long prompts (``long_prompt_tokens``)."""

    rounds: int = 3
    max_concurrency: int | None = None
    axes: list[str] = field(default_factory=lambda: list(AXES))
    long_prompt_tokens: int = 1024

    def validate(self) -> None:
        if self.rounds < 1:
            raise UsageError(f"`rounds` {self.rounds} must be at least 1",
                             hint="3 or more tell run-to-run from batch-to-batch differences")
        if self.max_concurrency is not None and not 2 <= self.max_concurrency <= MAX_TOP:
            raise UsageError(f"`max_concurrency` {self.max_concurrency} must be between 2 and {MAX_TOP}")
        bad = [a for a in self.axes if a not in AXES]
        if bad or not self.axes:
            raise UsageError(f"`axes` {','.join(self.axes) or '(none)'}: choose from {', '.join(AXES)}")
        if "depth" in self.axes and self.long_prompt_tokens < 1:
            raise UsageError(f"`long_prompt_tokens` {self.long_prompt_tokens} must be at least 1",
                             hint="or leave depth out of `axes`")


def parse_axes(text: str) -> list[str]:
    return [a for a in text.replace(" ", "").split(",") if a]


def coarse_levels(top: int) -> list[int]:
    """2, 4, 8, ... below ``top``, then ``top``."""
    out, level = [], 2
    while level < top:
        out.append(level)
        level *= 2
    return out + [top]


def next_level(tested: dict[int, bool]) -> int | None:
    """The level to test next (``tested``: level -> whether anything differed there): halfway between
    the first differing level and the highest identical one below it; None once they are adjacent."""
    differing = sorted(level for level, d in tested.items() if d)
    if not differing:
        return None
    below = [level for level in tested if level < differing[0]]
    if not below or differing[0] - max(below) <= 1:
        return None
    return (max(below) + differing[0]) // 2


def long_prompt(prompt: Prompt, pool: list[Prompt], index: int, tokens: int, count: Callable[[str], int]) -> Prompt:
    """``prompt`` behind a context of at least ``tokens`` tokens (as ``count`` counts them): the other
    prompts of the set, starting after this one (so no two long prompts share their first tokens)."""
    texts = [p.as_text().strip() for p in pool[index + 1:] + pool[:index + 1]]
    texts = [t for t in texts if t] or ["(no text)"]
    chars = 3 * tokens
    for _ in range(8):
        pieces, size = [], 0
        while size < chars:
            pieces.append(texts[len(pieces) % len(texts)])
            size += len(pieces[-1]) + 2
        context = LONG_INTRO + "\n\n".join(pieces)
        got = count(context)
        if got >= tokens:
            break
        chars = int(chars * tokens / max(got, 1) * 1.1) + 64
    pid = f"{prompt.id}@{LONG}"
    if prompt.messages is None:
        return Prompt(pid, context + LONG_QUESTION + (prompt.text or ""), None)
    msgs = [dict(m) for m in prompt.messages]
    users = [i for i, m in enumerate(msgs) if m.get("role") == "user"]
    if not users:
        return Prompt(pid, None, [{"role": "user", "content": context}] + msgs)
    j = users[-1]
    msgs[j]["content"] = context + LONG_QUESTION + str(msgs[j].get("content", ""))
    return Prompt(pid, None, msgs)


class Sweep:
    """The plan of one sweep: its requests (the prompts, and the variants its axes need), the units of
    each stage (:meth:`stages`), and the card made of what they found (:meth:`card`)."""

    def __init__(self, spec: SweepSpec, backend, requests: list[Request], settings: Settings, *, tokenizer: Any,
                 seed: int, out: Path, log: Callable[[str], None]):
        self.spec, self.backend, self.settings = spec, backend, settings
        self.seed, self.out, self.log = seed, Path(out), log
        self.n = len(requests)
        info = backend.info
        self.top = spec.max_concurrency or min(info.slots or DEFAULT_TOP, MAX_TOP)
        self.top = max(self.top, 2)
        self.levels = coarse_levels(self.top)
        self.skipped: dict[str, str] = {}  # axis -> why it was not run
        self.requests: list[Request] = list(requests)
        self.variants: dict[str, list[int]] = {"": list(range(self.n))}
        self.arrivals = [name for name, axis in (("together", "concurrency"), ("staggered", "staggered"))
                         if axis in spec.axes]
        self.cache = "cache" in spec.axes and self._cache_possible()
        self.counted_by: str | None = None
        if "depth" in spec.axes:
            self._add(LONG, self._long(requests, tokenizer))
        if "route" in spec.axes:
            self._add(CHAT, self._chat(requests))

    # ------------------------------------------------------------------ requests

    def _cache_possible(self) -> bool:
        cache = self.backend.info.prefix_cache
        if cache is None:
            self.skipped["cache"] = (f"the server ({self.backend.info.engine}) exposes no prompt-cache setting "
                                     "mgaudit can read or switch per request")
        elif not cache.get("enabled"):
            self.skipped["cache"] = "the server's prefix cache is off"
        elif cache.get("switch") is None:
            self.skipped["cache"] = ("the server's prefix cache is on with no per-request switch: any request may "
                                     "read a repeated prompt from it, those sent alone included")
        return "cache" not in self.skipped

    def _add(self, variant: str, reqs: list[Request] | None) -> None:
        if reqs is None:
            return
        start = len(self.requests)
        self.requests += [Request(r.prompt, start + k, r.ids) for k, r in enumerate(reqs)]
        self.variants[variant] = list(range(start, start + len(reqs)))

    def _counter(self, tokenizer: Any) -> Callable[[str], int]:
        if tokenizer is not None:
            self.counted_by = "tokenizer"
            return lambda text: len(tokenizer.encode(text, add_special_tokens=False))
        if self.backend.tokens_of("a test") is not None:
            self.counted_by = "the server's /tokenize"
            return lambda text: self.backend.tokens_of(text) or 0
        self.counted_by = "estimated at 4 characters a token"
        return lambda text: len(text) // 4

    def _long(self, requests: list[Request], tokenizer: Any) -> list[Request] | None:
        from ..prompts import encode_prompt

        count, tokens = self._counter(tokenizer), self.spec.long_prompt_tokens
        prompts = [r.prompt for r in requests]
        out = []
        for i, r in enumerate(requests):
            p = long_prompt(r.prompt, prompts, i, tokens, count)
            ids = None if r.ids is None else tuple(encode_prompt(tokenizer, p, chat=self.settings.chat))
            out.append(Request(p, i, ids))
        longest = max(len(r.ids) if r.ids is not None else count(r.prompt.as_text()) for r in out)
        context = self.backend.context()
        if context is not None and longest + self.settings.max_new_tokens > context:
            self.skipped["depth"] = (f"long prompts of {longest} tokens and {self.settings.max_new_tokens} new tokens "
                                     f"do not fit the server's {context} tokens per sequence")
            return None
        return out

    def _chat(self, requests: list[Request]) -> list[Request] | None:
        if not self.settings.chat:
            self.skipped["route"] = "the chat template is off (`chat`): there is no chat route to compare"
        elif requests[0].ids is None:
            self.skipped["route"] = ("the prompts go through the server's chat template only: give `model` (a "
                                     "tokenizer) to send token ids as well")
        else:
            return [Request(Prompt(f"{r.id}@{CHAT}", r.prompt.text, r.prompt.messages), i) for i, r in
                    enumerate(requests)]
        return None

    def fingerprint(self) -> dict[str, Any]:
        """What a resumed sweep must share with the one it resumes."""
        return {**asdict(self.spec), "top": self.top, "variants": {v: len(p) for v, p in self.variants.items()},
                "skipped": self.skipped}

    # ------------------------------------------------------------------ units

    def _path(self, kind: str, level: int, group: int, round: int, variant: str) -> Path:
        return self.out / unit_name(kind, level, group, round, variant)

    def _chunks(self, variant: str) -> list[list[int]]:
        pos = self.variants[variant]
        return [pos[c:c + CHUNK] for c in range(0, len(pos), CHUNK)]

    def _references(self) -> list[Unit]:
        return [Unit(self._path("reference", 1, c, 0, v), "reference", members=m, variant=v)
                for v in self.variants for c, m in enumerate(self._chunks(v))]

    def _singles(self, kind: str, variant: str) -> list[Unit]:
        return [Unit(self._path(kind, 1, c, r, variant), "candidate", Condition(kind, 1, r), c, m, len(m), variant)
                for r in range(self.spec.rounds) for c, m in enumerate(self._chunks(variant))]

    def _groups(self, kind: str, level: int, variant: str = "", spacing: float | None = None) -> list[Unit]:
        pos = self.variants[variant]
        out = []
        for r in range(self.spec.rounds):
            for g, (members, owned) in enumerate(batch_groups(len(pos), level, self.seed + r)):
                cond = Condition(kind, level, r, spacing=spacing if kind == "staggered" else None)
                out.append(Unit(self._path(kind, level, g, r, variant), "candidate", cond, g,
                                [pos[m] for m in members], owned, variant))
        return out

    def _arrival(self, name: str, level: int, spacing: Callable[[int], float]) -> list[Unit]:
        kind = ARRIVALS[name]
        return self._groups(kind, level, "", spacing(level) if kind == "staggered" else None)

    def stages(self) -> Iterator[list[Unit]]:
        """The units of each stage; each stage is planned once the one before it is on disk."""
        first = self._references() + [u for v in self.variants for u in self._singles("alone", v)]
        if self.cache:
            first += [u for v in ("", LONG) if v in self.variants for u in self._singles("warm-cache", v)]
        self.log(f"sweep: up to {self.top} in flight (levels {', '.join(map(str, self.levels))}, refined where an "
                 f"onset lies between two), {self.spec.rounds} round(s); at most {self.bound()} requests")
        yield first
        spacing = self._spacing()
        second = [u for name in self.arrivals for level in self.levels for u in self._arrival(name, level, spacing)]
        second += [u for v in (LONG, CHAT) if v in self.variants for u in self._groups("in-flight", self.top, v)]
        yield second
        while True:
            units = outcomes.read_units(self.out)
            todo = [(name, self._refinement(units, ARRIVALS[name])) for name in self.arrivals]
            nxt = [u for name, level in todo if level is not None for u in self._arrival(name, level, spacing)]
            if not nxt:
                return
            self.log("sweep: refining " + ", ".join(f"{name} at {level}" for name, level in todo if level))
            yield nxt

    def _refinement(self, units: list[outcomes.UnitOutcome], kind: str) -> int | None:
        tested = {level: outcomes.differs(us) for level, us in outcomes.select(units, kind).items()}
        tested[1] = outcomes.differs(outcomes.select(units, "alone").get(1, []))
        return next_level(tested)

    def _spacing(self) -> Callable[[int], float]:
        """Seconds between staggered arrivals at a level: half of a request's time alone (median of the
        alone runs on disk), spread over the level, so every request joins a batch mid-decode."""
        alone = outcomes.select(outcomes.read_units(self.out), "alone").get(1, [])
        times = [float(r["seconds"]) for u in alone for r in u.requests if r.get("seconds")]
        t = statistics.median(times) if times else 0.5
        return lambda level: round(max(t / (2 * level), 0.001), 4)

    def bound(self) -> int:
        """The most requests the plan can send (teacher-forced scoring of diverged sequences aside)."""
        rounds, single = self.spec.rounds, sum(len(p) for p in self.variants.values())
        total = single * (1 + rounds)  # reference and alone runs
        if self.cache:
            total += 2 * rounds * sum(len(self.variants[v]) for v in ("", LONG) if v in self.variants)
        groups = [rounds * -(-self.n // level) * level for level in self.levels]  # a short group is filled up
        refinements = max(self.top.bit_length() - 1, 0) * rounds * (self.n + self.top - 1)
        total += len(self.arrivals) * (sum(groups) + refinements)
        total += groups[-1] * sum(v in self.variants for v in (LONG, CHAT))
        return total

    # ------------------------------------------------------------------ the card

    def card(self, provenance: dict[str, Any]):
        """The card of what the unit files on disk hold (see :mod:`mgaudit.formats.card`)."""
        from ..formats.card import Card

        units = outcomes.read_units(self.out)
        series = self._series(units)
        onsets = {s["name"]: s["onset"] for s in series if s["axis"] == "concurrency"}
        engine = {**self.backend.info.summary(), "engine_note": self.backend.engine_note}
        not_run = [{"axis": a, "reason": r} for a, r in self.skipped.items()]
        not_run += [{"axis": a, "reason": "not asked for (`axes`)"} for a in AXES if a not in self.spec.axes]
        return Card(engine=engine, sweep=self._what_ran(series), series=series, onsets=onsets,
                    position=position_onset(series), expectation=expectation(onsets, engine), not_run=not_run,
                    notes=cache_notes(series, engine), requests=self._requests(units), provenance=provenance)

    def _series(self, units: list[outcomes.UnitOutcome]) -> list[dict[str, Any]]:
        steps = self.settings.max_new_tokens

        def rows(kind: str, variant: str = "", only: int | None = None) -> list[dict[str, Any]]:
            return [outcomes.level_row(us, level, steps) for level, us in outcomes.select(units, kind, variant).items()
                    if only is None or level == only]

        out: list[dict[str, Any]] = []

        def add(axis: str, name: str, found: list[dict[str, Any]], onset: bool = False) -> None:
            if found:
                firsts = [(x, r["level"]) for r in found for x in r["first_divergences"]]
                out.append({"axis": axis, "name": name, "rows": found, "onset": outcomes.onset(found) if onset else None,
                            "earliest_divergence": None if not firsts else dict(zip(("step", "level"), min(firsts)))})

        alone = rows("alone")
        add("repetition", "alone, run to run", alone)
        for name in self.arrivals:
            add("concurrency", name, alone + rows(ARRIVALS[name]), onset=True)
        if self.cache:
            add("cache", "cold", alone)
            add("cache", "warm", rows("warm-cache"))
            add("cache", "cold, long prompts", rows("alone", LONG))
            add("cache", "warm, long prompts", rows("warm-cache", LONG))
        for variant, axis, name in ((LONG, "depth", "long prompts"), (CHAT, "route", "chat template (server)")):
            if variant in self.variants:
                add(axis, "prompts as given" if axis == "depth" else "token ids (completions)",
                    alone + rows("in-flight", "", self.top))
                add(axis, name, rows("alone", variant) + rows("in-flight", variant))
        return out

    def _what_ran(self, series: list[dict[str, Any]]) -> dict[str, Any]:
        tested = sorted({r["level"] for s in series if s["axis"] == "concurrency" for r in s["rows"]})
        return {"prompts": self.n, "max_new_tokens": self.settings.max_new_tokens, "rounds": self.spec.rounds,
                "top": self.top, "levels": [1] + self.levels, "refined": [x for x in tested if x not in self.levels
                                                                           and x != 1],
                "axes": list(self.spec.axes), "route": self.backend.route, "seed": self.seed,
                "long_prompt_tokens": self.spec.long_prompt_tokens if LONG in self.variants else None,
                "long_prompts_counted_by": self.counted_by if LONG in self.variants else None,
                "staggered_spacing": "half a request's time alone, spread over the level" if "staggered" in
                self.arrivals else None}

    def _requests(self, units: list[outcomes.UnitOutcome]) -> dict[str, Any]:
        sent = sum(len(u.requests) * (2 if u.condition == "warm-cache" else 1) for u in units)
        return {"candidate": sent, "reference": sum(len(p) for p in self.variants.values()), "bound": self.bound(),
                "retried": sum(int((r.get("attempts") or 1) > 1) for u in units for r in u.requests)}


def position_onset(series: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The earliest token position (generated token index) where any sequence of any series parted."""
    found = [(s["earliest_divergence"]["step"], s["earliest_divergence"]["level"], s["axis"], s["name"])
             for s in series if s.get("earliest_divergence")]
    if not found:
        return None
    step, level, axis, name = min(found)
    return {"step": step, "level": level, "axis": axis, "series": name,
            "statement": f"earliest divergence at token {step} ({axis}: {name}, {level} in flight)"}


def expectation(onsets: dict[str, Any], engine: dict[str, Any]) -> dict[str, Any] | None:
    """What ``verify --card`` checks: identical up to the highest level below the onset of requests sent
    together (or every level tested), with the prefix-cache setting the card was measured with."""
    o = onsets.get("together")
    if o is None:
        return None
    level = o.get("identical_up_to")
    cache = (engine.get("prefix_cache") or {}).get("enabled")
    words = "" if cache is None else f", prefix cache {'on' if cache else 'off'}"
    return {"arrival": "together", "identical_up_to": level, "prefix_cache": cache,
            "statement": f"identical up to {level} in flight{words}" if level else
            "not even identical alone, run to run: nothing to expect under load"}


def cache_notes(series: list[dict[str, Any]], engine: dict[str, Any]) -> list[str]:
    """Warm-cache rows whose requests found nothing cached compare two cold runs: say so."""
    block = (engine.get("prefix_cache") or {}).get("block_size")
    out = []
    for s in series:
        if s["axis"] != "cache" or not s["name"].startswith("warm"):
            continue
        cached = s["rows"][0].get("cached_prompt_tokens")
        if cached is None:
            out.append(f"cache {s['name']}: the server does not say how many prompt tokens it found cached")
        elif cached == 0:
            out.append(f"cache {s['name']}: the server found no prompt tokens cached, so this row compares two "
                       "cold runs" + (f" (it caches whole blocks of {block} tokens)" if block else ""))
    return out
