"""``scan``: decode prompts alone and under load; record every step to Parquet.

The same job for every backend (:mod:`mgaudit.audit`): each prompt's **reference** run (its
backend alone: the candidate's own, or the one ``reference`` names) and the **candidate**
runs, one per batch size B:

* the local model: the prompts grouped into batches of B (a seeded permutation of the set;
  a last, short batch is filled up with prompts from the start of that permutation, whose
  rows are not recorded twice), each batch left-padded as ``generate`` runs it;
* a server: the same groups, the B requests of a group sent at once (each runs while the
  B-1 others are in flight); with ``prefix_cache``, each prompt alone with a warm cache too;
* where the reference is another backend: each prompt alone on the candidate too.

Each candidate run is compared with its reference in two modes: ``sync`` (teacher-forced:
the candidate fed the reference's tokens, every step compares the same prefix: per-step
flip rates) and ``free`` (free-running: where sequences part). Each unit of work is its own
Parquet file, written atomically (:mod:`mgaudit.audit.tracedir`): an interrupted scan
leaves only complete files and ``resume`` skips what is done.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .audit.conditions import batch_groups
from .audit.options import AuditOptions
from .errors import UsageError
from .progress import Stage, as_callback

if TYPE_CHECKING:  # pragma: no cover
    from .audit.sweep import SweepSpec

SOLO_CHUNK = 8
MODES = ("sync", "free")


@dataclass
class ScanConfig(AuditOptions):
    prompts: str
    out: Path
    batch_sizes: list[int] = field(default_factory=lambda: [4, 8, 16])
    max_new_tokens: int = 64
    seed: int = 0
    limit: int | None = None
    chat: bool = True
    modes: list[str] = field(default_factory=lambda: ["sync", "free"])
    resume: bool = False
    overwrite: bool = False
    skip_long: bool = False  # skip prompts that do not fit the context (else: ContextLengthError)
    prefix_cache: bool = False  # a server: also each prompt alone with a warm prompt cache
    sweep: SweepSpec | None = None  # a server: its determinism sweep and card instead of `batch_sizes`

    def validate(self) -> None:
        self.validate_audit()
        if not self.batch_sizes:
            raise UsageError("`batch_sizes` is empty", hint="give sizes like 4,8,16")
        if any(b < 2 for b in self.batch_sizes):
            raise UsageError(f"`batch_sizes` {self.batch_sizes}: every size must be at least 2",
                             hint="batch size 1 is the reference, always run")
        if self.max_new_tokens < 1:
            raise UsageError(f"`max_new_tokens` {self.max_new_tokens} must be at least 1")
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise UsageError(f"`modes` {','.join(self.modes)}: use sync, free or both")
        if self.resume and self.overwrite:
            raise UsageError("`resume` and `overwrite` exclude each other")
        if self.prefix_cache and self.endpoint is None:
            raise UsageError("`prefix_cache` compares a server's warm and cold prompt cache",
                             hint="give `endpoint` too")
        if self.sweep is not None:
            self.sweep.validate()
            if self.endpoint is None:
                raise UsageError("`sweep` maps where a server's batching changes its answers", hint="give `endpoint`")
            if self.reference is not None:
                raise UsageError("`sweep` compares the server with itself alone; `reference` compares it with "
                                 "another backend", hint="run them as two scans")
            if "free" not in self.modes:
                raise UsageError("`sweep` needs the free mode (`modes` free or sync,free)")
            if self.prefix_cache:
                raise UsageError("`prefix_cache` is one axis of the sweep", hint="drop it; `axes` chooses the axes")


def parse_batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise UsageError(f"`batch_sizes` {text!r} is not a comma-separated list of integers",
                         hint="e.g. `batch_sizes` 4,8,16") from None
    if not sizes:
        raise UsageError("`batch_sizes` is empty", hint="e.g. `batch_sizes` 4,8,16")
    return sorted(set(sizes))


@dataclass
class ScanResult:
    out: Path
    summary: dict[str, Any]
    files_written: int
    files_skipped: int
    seconds: float
    card: Any = None  # the determinism card of a sweep (mgaudit.formats.card.Card)


def cap_batch_sizes(sizes: list[int], n: int) -> tuple[list[int], list[int]]:
    """Batch sizes for ``n`` prompts: sizes above ``n`` become ``n`` (a batch would otherwise repeat
    the same prompts). Returns (sizes to run, sizes that were capped)."""
    if n < 2:
        raise UsageError(f"{n} prompt(s): batched replays need at least 2 prompts",
                         hint="give a prompt set with at least 2 prompts")
    capped = [b for b in sizes if b > n]
    return sorted({min(b, n) for b in sizes}), capped


def scan(config: ScanConfig, progress=None, log: Callable[[str], None] | None = None, loaded=None) -> ScanResult:
    """Run the scan described by ``config``; return the summary. See the module doc."""
    from .audit.backend import build_requests
    from .audit.pair import open_pair
    from .audit.steps import Settings
    from .audit.tracedir import TraceDir
    from .prompts import load_prompts

    log = log or (lambda msg: None)
    config.validate()
    t0 = time.perf_counter()
    threshold = config.threshold_of()
    prompt_set = load_prompts(config.prompts, limit=config.limit)
    tdir = TraceDir(config.out)
    tdir.check(config.resume, config.overwrite)  # every output check before any model work
    settings = Settings(config.max_new_tokens, config.chat, sampling=config.sampling())
    with open_pair(config, loaded=loaded, log=log) as pair:
        if config.prefix_cache and pair.candidate.info.cache_switch is None:
            raise UsageError(f"the server at {pair.candidate.url} ({pair.candidate.info.engine}) exposes no "
                             "prompt-cache switch", hint="the warm/cold cache axis needs llama.cpp's cache_prompt "
                             "or vLLM with prefix caching on (cache_salt)")
        vocabulary = pair.check_vocabularies()
        context = (pair.reference if pair.reference.kind == "local" else pair.candidate).context()
        requests, skipped = build_requests(prompt_set, pair.tokenizer(), settings, context, config.skip_long, log)
        sweep = None
        if config.sweep is not None:
            from .audit.sweep import Sweep

            sweep = Sweep(config.sweep, pair.candidate, requests, settings, tokenizer=pair.tokenizer(),
                          seed=config.seed, out=tdir.path, log=log)
            requests = sweep.requests
        job = _ScanJob(config, pair, requests, settings, threshold, tdir, as_callback(progress), log, sweep)
        written, skipped_units = job.run(prompt_set, skipped, vocabulary)
        summary = job.summarize(time.perf_counter() - t0)
        card = job.card()
    return ScanResult(Path(config.out), summary, written, skipped_units, time.perf_counter() - t0, card)


class _ScanJob:
    """One scan: the units to run, the reference runs, writing and summarising."""

    def __init__(self, config: ScanConfig, pair, requests, settings, threshold, tdir, report, log, sweep=None):
        self.config, self.pair, self.requests, self.settings = config, pair, requests, settings
        self.threshold, self.tdir, self.report, self.log = threshold, tdir, report, log
        self.n = len(requests)
        self.sweep = sweep  # mgaudit.audit.sweep.Sweep: its stages are the plan

    # ------------------------------------------------------------------ plan

    def conditions(self, sizes: list[int]) -> list:
        from .audit.conditions import Condition

        cand = self.pair.candidate
        kind = "padded" if cand.kind == "local" else "in-flight"
        out = [Condition(kind, b) for b in sizes]
        if self.pair.cross:
            out.insert(0, Condition("alone"))
        if self.config.prefix_cache:
            out.append(Condition("warm-cache"))
        return out

    def units(self, sizes: list[int]) -> list:
        from .audit.tracedir import Unit, unit_name

        out, out_dir, n = [], self.tdir.path, self.n
        chunks = [list(range(c, min(n, c + SOLO_CHUNK))) for c in range(0, n, SOLO_CHUNK)]
        for c, members in enumerate(chunks):
            out.append(Unit(out_dir / unit_name("reference", 1, c), "reference", members=members))
        for cond in self.conditions(sizes):
            if cond.kind in ("alone", "warm-cache"):
                for c, members in enumerate(chunks):
                    out.append(Unit(out_dir / unit_name(cond.kind, 1, c), "candidate", cond, c, members, len(members)))
                continue
            for g, (members, owned) in enumerate(batch_groups(n, cond.level, self.config.seed)):
                out.append(Unit(out_dir / unit_name(cond.kind, cond.level, g), "candidate", cond, g, members, owned))
        return out

    def fingerprint(self, prompts_sha: str) -> dict[str, Any]:
        c = self.config
        fp = {"prompts_sha256": prompts_sha, "candidate": self.pair.candidate.identity(),
              "max_new_tokens": c.max_new_tokens, "seed": c.seed, "chat": c.chat, "limit": c.limit,
              "modes": sorted(c.modes), "skip_long": c.skip_long, "prefix_cache": c.prefix_cache,
              "threshold": None if self.threshold is None else self.threshold.tau}
        if self.pair.cross:
            fp["reference"] = self.pair.reference.identity()
        if not self.settings.sampling.greedy:
            fp["sampling"] = self.settings.sampling.key()
        if self.sweep is not None:
            fp["sweep"] = self.sweep.fingerprint()
        return _jsonable(fp)

    # ------------------------------------------------------------------ run

    def run(self, prompt_set, skipped: list[str], vocabulary: dict[str, Any]) -> tuple[int, int]:
        from .audit.refcache import ReferenceRuns
        from .formats.provenance import run_provenance
        from .models import cache_root

        c, pair = self.config, self.pair
        fp = self.fingerprint(prompt_set.sha256)
        sizes = self._sizes(fp) if self.sweep is None else []
        if self.sweep is not None and c.resume:
            self.tdir.earlier_sizes(fp)  # refuses a sweep made with other options
        self.provenance = run_provenance(
            _stack(pair), prompt_set, c, count=self.n,
            prompts_extra={"skipped_too_long": skipped}, batch_sizes=sizes, vocabulary=vocabulary,
            threshold=None if self.threshold is None else self.threshold.source)
        self.tdir.begin(fp, sizes, self.provenance, c.overwrite, self.log)
        # a local padded batch records the largest logit difference from the reference: keep its logits
        self.keep_logits = not pair.cross and pair.candidate.kind == "local"
        self.refs = ReferenceRuns(pair.reference, self.settings, cache_root() if c.reference_cache else None,
                                  read_back=self.tdir.reference_runs() if c.resume else None)
        written = done = 0
        for plan in ([self.units(sizes)] if self.sweep is None else self.sweep.stages()):
            w, d = self._execute(plan)
            written, done = written + w, done + d
        return written, done

    def _sizes(self, fp: dict[str, Any]) -> list[int]:
        """The batch sizes to run: as given (capped to the prompts), plus those a resumed scan covers."""
        c, pair = self.config, self.pair
        earlier = self.tdir.earlier_sizes(fp) if c.resume else []
        sizes, capped = cap_batch_sizes(c.batch_sizes, self.n)
        if capped:
            self.log(f"batch size(s) {', '.join(map(str, capped))} exceed the {self.n} prompts: capped to {self.n}")
        if earlier and set(earlier) != set(sizes):
            self.log(f"resuming with batch sizes {', '.join(map(str, sizes))}; the scan already has "
                     f"{', '.join(map(str, earlier))}: it now covers {', '.join(map(str, sorted(set(earlier) | set(sizes))))}")
        sizes = sorted(set(earlier) | set(sizes))
        slots = getattr(getattr(pair.candidate, "info", None), "slots", None)
        if slots is not None and max(sizes) > slots:
            self.log(f"note: the server has {slots} slots; groups of {max(sizes)} queue beyond that")
        if pair.candidate.kind == "local":
            from .resources import check_fits

            check_fits(pair.candidate.lm, max(sizes), max(r.prompt_len for r in self.requests), c.max_new_tokens,
                       kept_logits_rows=self.n * c.max_new_tokens)
        return sizes

    def _execute(self, plan: list) -> tuple[int, int]:
        """Run the units of ``plan`` not on disk yet: (files written, files found complete)."""
        todo = [u for u in plan if not u.path.exists()]
        if len(plan) > len(todo):
            self.log(f"resuming: {len(plan) - len(todo)} of {len(plan)} trace files already complete")
        needed = sorted({i for u in todo for i in u.members})
        stage = Stage(self.report, "solo", "reference runs", len(needed), unit="prompts")
        self.refs.get([self.requests[i] for i in needed], keep_logits=self.keep_logits and any(
            u.kind == "candidate" for u in todo), on_done=lambda k: stage.advance(k))
        written = 0
        for u in (u for u in todo if u.kind == "reference"):
            self._write_reference(u)
            written += 1
        groups = [u for u in todo if u.kind == "candidate"]
        stage = Stage(self.report, "batched", "candidate runs", len(groups), unit="groups")
        for u in groups:
            stage.relabel(f"candidate runs ({u.condition.describe()})")
            self._run_group(u)
            written += 1
            stage.advance()
        return written, len(plan) - len(todo)

    def _write_reference(self, u) -> None:
        from .formats.traces import RowKey, solo_rows

        reqs = [self.requests[i] for i in u.members]
        runs = self.refs.get(reqs)
        rows = []
        for r, run in zip(reqs, runs):
            rows.extend(solo_rows(RowKey(r.id, r.index, _plen(r, run), batch_index=r.index,
                                         draw_seed=self.settings.draw_seed(r)), run))
        self.tdir.write(u, rows, {**self.provenance, "unit": {"kind": "reference", "condition": "alone",
                                                              "batch_size": 1, "requests": _metas(reqs, runs)}})

    def _run_group(self, u) -> None:
        from .formats.traces import RowKey, pair_rows

        cand, cond = self.pair.candidate, u.condition
        reqs = [self.requests[i] for i in u.members]
        refs = self.refs.get(reqs)
        t1 = time.perf_counter()
        if cond.kind in ("alone", "warm-cache"):  # one prompt at a time
            free = [cand.together([r], cond, self.settings, references=[ref])[0] for r, ref in zip(reqs, refs)]
        else:
            free = cand.together(reqs, cond, self.settings, references=refs)
        seconds = time.perf_counter() - t1
        forced = None
        if "sync" in self.config.modes:
            forced = cand.forced(reqs, cond, self.settings, refs, free)
        severity = self.threshold.of_steps if self.threshold is not None else None
        rows = []
        for row in range(u.owned):
            r, ref = reqs[row], refs[row]
            single = cond.kind in ("alone", "warm-cache")
            key = RowKey(r.id, r.index, _plen(r, ref), cond.kind, cond.level, cond.round,
                         r.index if single else u.group, 0 if single else row, free[row].meta.get("pad_len", 0),
                         self.settings.draw_seed(r))
            if forced is not None:
                rows.extend(pair_rows("sync", key, ref, forced[row], severity))
            if "free" in self.config.modes:
                rows.extend(pair_rows("free", key, ref, free[row], severity))
        unit = {"kind": "candidate", "condition": cond.kind, "batch_size": cond.level, "round": cond.round,
                "group": u.group, "owned": u.owned, "seconds": seconds, "max_new_tokens": self.settings.max_new_tokens,
                "requests": _metas(reqs, free)}
        if u.variant or cond.spacing is not None:  # a sweep's prompt variant, its staggered arrivals
            unit.update(variant=u.variant, spacing=cond.spacing)
        self.tdir.write(u, rows, {**self.provenance, "unit": unit})

    # ------------------------------------------------------------------ summary

    def summarize(self, elapsed: float) -> dict[str, Any]:
        from .formats.traces import read_traces
        from .summary import runs_summary, summarize

        table, _ = read_traces(self.tdir.path)
        summary = summarize(table)
        summary["runs"] = runs_summary(self.tdir.units())
        summary["reference"] = {"cross": self.pair.cross, "backend": self.pair.reference.kind,
                                "label": self.pair.reference.label, **self.refs.describe()}
        summary["scoring"] = self.pair.candidate.scoring()
        if self.pair.candidate.kind == "endpoint":
            summary["endpoint"] = self.pair.candidate.io()
        summary["provenance"] = self.provenance
        summary["elapsed_seconds"] = elapsed
        self.tdir.write_summary(_jsonable(summary))
        return summary

    def card(self):
        """A sweep's card, written beside the traces (None for a plain scan)."""
        if self.sweep is None:
            return None
        from .machine import describe

        card = self.sweep.card(_jsonable({**self.provenance, "machine": describe()}))
        card.write(self.tdir.path)
        return card


def _plen(req, run) -> int:
    """A prompt's length in tokens: the ids sent, else what the server reported, else 0."""
    if req.prompt_len is not None:
        return req.prompt_len
    return int(run.meta.get("prompt_tokens") or 0)


def _metas(reqs, runs) -> list[dict[str, Any]]:
    keep = ("finish_reason", "seconds", "attempts", "cached_tokens", "cached_tokens_prime", "prompt_tokens")
    return [{"prompt_id": r.id, "tokens": len(run), **{k: run.meta[k] for k in keep if k in run.meta}}
            for r, run in zip(reqs, runs)]


def _stack(pair) -> dict[str, Any]:
    """The provenance stack: the candidate's, with the reference's beside it where it is another backend."""
    stack = dict(pair.candidate.stack())
    if pair.cross:
        stack["reference"] = pair.reference.stack()
    return stack


def _jsonable(obj: Any) -> Any:
    import json

    return json.loads(json.dumps(obj, default=str))
