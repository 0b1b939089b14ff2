"""``scan``: replay prompts solo and inside batches; record every step to Parquet.

For each prompt a solo reference (batch size 1, greedy) is decoded. Then for each
batch size B the prompts are grouped into batches of B (the grouping is a seeded
permutation of the set; a last, short batch is filled up with prompts from the
start of that permutation, whose rows are not recorded twice), and each batch is
replayed with generate-style left padding in two modes:

* ``sync``: teacher-forced on the solo tokens, so every step compares the same
  prefix: per-step flip rates;
* ``free``: the batch feeds its own tokens: sequence-level divergence.

Each unit of work (a chunk of solo references, or one batch of one size) is
written as its own Parquet file, atomically, so an interrupted scan leaves only
complete files and ``resume=True`` skips what is done.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .models import ModelOptions
from .errors import OutputError, UsageError
from .progress import Stage, as_callback
from .formats.provenance import run_provenance
from .formats.traces import (atomic_write_json, check_output_dir, is_mgaudit_trace, pair_rows,
                     solo_rows, stale_temp_files, trace_files, trace_writer)

SOLO_CHUNK = 8
MANIFEST = "_scan.json"
SUMMARY = "_summary.json"


@dataclass
class ScanConfig(ModelOptions):
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

    def validate(self) -> None:
        if not self.batch_sizes:
            raise UsageError("`batch_sizes` is empty", hint="give sizes like 4,8,16")
        if any(b < 2 for b in self.batch_sizes):
            raise UsageError(f"`batch_sizes` {self.batch_sizes}: every size must be at least 2",
                             hint="batch size 1 is the solo reference, always run")
        if self.max_new_tokens < 1:
            raise UsageError(f"`max_new_tokens` {self.max_new_tokens} must be at least 1")
        bad = [m for m in self.modes if m not in ("sync", "free")]
        if bad or not self.modes:
            raise UsageError(f"`modes` {','.join(self.modes)}: use sync, free or both")
        if self.resume and self.overwrite:
            raise UsageError("`resume` and `overwrite` exclude each other")


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


def batch_groups(n: int, batch_size: int, seed: int) -> list[tuple[list[int], int]]:
    """Batches of prompt indices: (members, owned). The first ``owned`` members are recorded."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    groups = []
    for start in range(0, n, batch_size):
        members = order[start:start + batch_size]
        owned = len(members)
        k = 0
        while len(members) < batch_size:  # fill a short batch with other prompts of the set
            members.append(order[k % n])
            k += 1
        groups.append((members, owned))
    return groups


def _fingerprint(config: ScanConfig, prompt_sha: str, model_prov: dict[str, Any]) -> dict[str, Any]:
    return {
        "prompts_sha256": prompt_sha,
        "model": model_prov["model"].get("name"),
        "model_sha256": model_prov["model"].get("sha256"),
        "dtype": model_prov["model"].get("dtype"),
        "device": model_prov["model"].get("device"),
        "attn_implementation": model_prov["model"].get("attn_implementation"),
        "max_new_tokens": config.max_new_tokens,
        "seed": config.seed,
        "chat": config.chat,
        "limit": config.limit,
        "modes": sorted(config.modes),
        "skip_long": config.skip_long,
    }


#: Fingerprint entries added after the first release, with the value older manifests imply.
FINGERPRINT_DEFAULTS = {"skip_long": False}


def _check_out(config: ScanConfig) -> None:
    """Check --out before any model work, changing nothing: a writable directory (or one that can be
    created), no Parquet files there that mgaudit did not write, and no earlier scan unless resuming
    or overwriting."""
    out = Path(config.out)
    check_output_dir(out, "`out`")
    if not out.is_dir():
        return
    parquet = trace_files(out)
    foreign = [f for f in parquet if not (f.name.startswith("trace-") and is_mgaudit_trace(f))]
    if foreign:
        names = ", ".join(f.name for f in foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputError(f"{out} holds {len(foreign)} Parquet file(s) that mgaudit did not write ({names}); "
                          "they would be read as traces and are never deleted",
                          hint="move them elsewhere or choose another directory for the traces")
    if parquet and not (config.resume or config.overwrite):
        raise OutputError(f"`out` {out} already holds {len(parquet)} trace file(s)",
                          hint="pass `resume` to continue that scan or `overwrite` to start over")


def _prepare_out(config: ScanConfig, log: Callable[[str], None]) -> None:
    """Create --out (only once the inputs and the model are known good), drop temp files an
    interrupted write left, and under overwrite remove what an earlier scan wrote: trace files
    that carry mgaudit's provenance, _scan.json and _summary.json. Nothing else is touched."""
    out = Path(config.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"`out` {out}: cannot create it ({exc.strerror or exc})",
                          hint="choose a writable directory") from exc
    stale = stale_temp_files(out)
    for f in stale:
        f.unlink()
    if stale:
        log(f"removed {len(stale)} temporary file(s) an interrupted write left in {out}")
    if config.overwrite:
        ours = [f for f in trace_files(out) if f.name.startswith("trace-") and is_mgaudit_trace(f)]
        for f in ours:
            f.unlink()
        for name in (MANIFEST, SUMMARY):
            if (out / name).exists():
                (out / name).unlink()


def _read_manifest(out: Path) -> dict[str, Any] | None:
    path = out / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise OutputError(f"{path}: unreadable ({exc.__class__.__name__})",
                          hint="start over with `overwrite` or use another `out`") from exc


def _check_manifest(out: Path, fingerprint: dict[str, Any]) -> list[int]:
    """Refuse to resume a scan made with other options; return the batch sizes it recorded."""
    manifest = _read_manifest(out)
    if manifest is None:
        if out.is_dir() and trace_files(out):
            raise OutputError(f"{out}: trace files without {MANIFEST}; cannot check they belong to this scan",
                              hint="use `overwrite` or another `out`")
        return []
    old = manifest.get("fingerprint", {})
    changed = [k for k in fingerprint if old.get(k, FINGERPRINT_DEFAULTS.get(k)) != fingerprint[k]]
    if changed:
        what = "; ".join(f"{k} was {old.get(k, FINGERPRINT_DEFAULTS.get(k))!r}, now {fingerprint[k]!r}"
                         for k in changed)
        raise OutputError(f"`resume`: {out} was scanned with different {', '.join(changed)} ({what})",
                          hint="resume with the same options, or use `overwrite` / another `out`")
    sizes = manifest.get("batch_sizes")
    if sizes is None:  # older manifests: the sizes asked for
        sizes = (manifest.get("provenance") or {}).get("config", {}).get("batch_sizes") or []
    return sorted(int(b) for b in sizes)


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
    import torch

    from .decoding.stock import padded_decode, solo_decode
    from .models import model_context
    from .prompts import encode_prompt, fit_context, load_prompts
    from .resources import check_fits
    from .summary import summarize
    from .formats.traces import read_traces

    log = log or (lambda msg: None)
    report = as_callback(progress)
    config.validate()
    t0 = time.perf_counter()
    prompt_set = load_prompts(config.prompts, limit=config.limit)
    _check_out(config)  # every output check before any model work; nothing is created yet
    out = Path(config.out)
    torch.manual_seed(config.seed)
    lm = loaded or config.load(log=log)
    encoded_all = [encode_prompt(lm.tokenizer, p, chat=config.chat) for p in prompt_set.prompts]
    kept = fit_context([p.id for p in prompt_set.prompts], [len(e) for e in encoded_all], config.max_new_tokens,
                       model_context(lm.model), skip=config.skip_long)
    if len(kept) < len(encoded_all):
        log(f"skipped {len(encoded_all) - len(kept)} of {len(encoded_all)} prompts that do not fit the "
            f"model's context of {model_context(lm.model)} tokens with {config.max_new_tokens} new tokens")
    prompts = [prompt_set.prompts[i] for i in kept]
    encoded = [encoded_all[i] for i in kept]
    n = len(prompts)
    model_prov = lm.provenance()
    fingerprint = _fingerprint(config, prompt_set.sha256, model_prov)
    earlier = _check_manifest(out, fingerprint) if config.resume else []
    sizes, capped = cap_batch_sizes(config.batch_sizes, n)
    if capped:
        log(f"batch size(s) {', '.join(map(str, capped))} exceed the {n} prompts: capped to {n}")
    if earlier and set(earlier) != set(sizes):
        log(f"resuming with batch sizes {', '.join(map(str, sizes))}; the scan already has "
            f"{', '.join(map(str, earlier))}: it now covers {', '.join(map(str, sorted(set(earlier) | set(sizes))))}")
    sizes = sorted(set(earlier) | set(sizes))
    check_fits(lm, max(sizes), max(len(e) for e in encoded), config.max_new_tokens,
               kept_logits_rows=n * config.max_new_tokens)
    _prepare_out(config, log)
    skipped = [prompt_set.prompts[i].id for i in range(len(encoded_all)) if i not in kept]
    provenance = run_provenance(model_prov, prompt_set, config, prompts_extra={"skipped_too_long": skipped},
                                batch_sizes=sizes)
    atomic_write_json(out / MANIFEST, {"fingerprint": fingerprint, "batch_sizes": sizes, "provenance": provenance})

    index = kept  # prompt_index in the traces: the position in the prompt set as given
    eos, pad = lm.eos_token_ids, lm.pad_token_id
    plan = []  # (path, kind, payload)
    for c in range(0, n, SOLO_CHUNK):
        plan.append((out / f"trace-solo-{c // SOLO_CHUNK:04d}.parquet", "solo", list(range(c, min(n, c + SOLO_CHUNK)))))
    for b in sizes:
        for g, (members, owned) in enumerate(batch_groups(n, b, config.seed)):
            plan.append((out / f"trace-b{b:04d}-g{g:04d}.parquet", "batch", (b, g, members, owned)))
    todo = [p for p in plan if not p[0].exists()]
    skipped = len(plan) - len(todo)
    if skipped:
        log(f"resuming: {skipped} of {len(plan)} trace files already complete")

    needed = sorted({i for _, kind, pay in todo for i in (pay if kind == "solo" else pay[2])})
    solos: dict[int, Any] = {}
    written = 0
    stage = Stage(report, "solo", "solo reference", len(needed), unit="prompts")
    for i in needed:
        solos[i] = solo_decode(lm.model, encoded[i], config.max_new_tokens, eos, keep_logits=True)
        stage.advance()
    for path, kind, payload in todo:
        if kind != "solo":
            continue
        rows = []
        for i in payload:
            rows.extend(solo_rows(prompts[i].id, index[i], len(encoded[i]), solos[i]))
        with trace_writer(path, provenance) as w:
            w.write(rows)
        written += 1

    batch_units = [p for p in todo if p[1] == "batch"]
    stage = Stage(report, "batched", "batched replays", len(batch_units), unit="batches")
    for path, _, (b, g, members, owned) in batch_units:
        stage.relabel(f"batched replays (B={b})")
        batch_ids = [encoded[i] for i in members]
        refs = [solos[i] for i in members]
        width = max(len(x) for x in batch_ids)
        rows = []
        if "sync" in config.modes:
            sync = padded_decode(lm.model, batch_ids, config.max_new_tokens, eos, pad,
                                 forced=[r.tokens for r in refs], reference=refs)
            for row in range(owned):
                i = members[row]
                rows.extend(pair_rows("sync", prompts[i].id, index[i], b, g, row, width - len(batch_ids[row]),
                                       len(batch_ids[row]), refs[row], sync[row]))
        if "free" in config.modes:
            free = padded_decode(lm.model, batch_ids, config.max_new_tokens, eos, pad, reference=refs)
            for row in range(owned):
                i = members[row]
                rows.extend(pair_rows("free", prompts[i].id, index[i], b, g, row, width - len(batch_ids[row]),
                                       len(batch_ids[row]), refs[row], free[row]))
        with trace_writer(path, provenance) as w:
            w.write(rows)
        written += 1
        stage.advance()

    table, _ = read_traces(out)
    summary = summarize(table)
    summary["provenance"] = provenance
    summary["elapsed_seconds"] = time.perf_counter() - t0
    atomic_write_json(out / SUMMARY, summary)
    return ScanResult(out, summary, written, skipped, time.perf_counter() - t0)


