"""Trace files: the Parquet schema that ``scan`` writes, the row builders, and reading traces back.

A trace directory holds ``trace-*.parquet`` files that share one explicit schema,
so pandas (``pd.read_parquet(dir)``), DuckDB (``read_parquet('dir/*.parquet')``),
Spark or ``pyarrow.dataset`` open it without mgaudit. Provenance travels as JSON
in the schema metadata of every file. Non-Parquet files written beside them
(``_summary.json``, ``_scan.json``) start with ``_`` so that Parquet readers skip
them. Every file is written atomically (:mod:`mgaudit.formats.files`).

One row compares one step of a *reference* run (the ``solo_*`` columns: the prompt
decoded alone, by the same backend or by the one ``--reference`` names) with the same
step of a *candidate* run (the ``batched_*`` columns: the prompt decoded under the
row's ``condition`` at ``batch_size``).

Greedy rows and sampled rows share the schema. In a sampled row (seeded sampling, see
:mod:`mgaudit.decoding.sampling`) the ``*_token`` columns hold the sampled tokens, the
``*_top1_logit`` columns the sampled token's perturbed logit (logit + T * Gumbel), the
``*_margin`` columns the step's sampling margin in logit units (``*_top2_logit`` is top-1 minus
it), ``*_margin_kind`` which of its two parts was the smaller, and ``draw_seed``/``draw_counter``
the identity of the draw (the prompt's stream and the step). Version 3 files (greedy only) are
read as rows whose four sampling columns are null.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import TraceError
from . import parquet
from .parquet import PROVENANCE_KEY

SCHEMA_VERSION = "5"

#: One row per (prompt, condition, batch size, round, mode, step). ``mode`` is "solo" (the
#: reference run itself: batched_* repeat solo_*), "sync" (the candidate is fed the reference's
#: tokens, so both sides see the same prefix: teacher-forced) or "free" (the candidate feeds its
#: own tokens).
TRACE_FIELDS: list[pa.Field] = [
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("prompt_index", pa.int32(), nullable=False),
    # how the candidate ran: alone, padded (a generate-style batch), policy (a decode policy),
    # in-flight (requests sent together to a server), warm-cache (alone, prompt cache warm)
    pa.field("condition", pa.string(), nullable=False),
    pa.field("batch_size", pa.int32(), nullable=False),  # rows decoded together / requests in flight
    pa.field("round", pa.int32(), nullable=False),  # repetition of the same condition
    pa.field("mode", pa.string(), nullable=False),
    pa.field("batch_index", pa.int32(), nullable=False),  # which batch (group) of the set
    pa.field("row", pa.int32(), nullable=False),  # position of the prompt in its batch
    pa.field("pad_len", pa.int32(), nullable=False),  # left padding of that row
    pa.field("prompt_len", pa.int32(), nullable=False),  # prompt tokens, unpadded
    pa.field("step", pa.int32(), nullable=False),  # index of the generated token
    pa.field("solo_token", pa.int64(), nullable=False),
    pa.field("batched_token", pa.int64(), nullable=False),
    pa.field("solo_runner_up", pa.int64(), nullable=False),
    pa.field("batched_runner_up", pa.int64(), nullable=False),
    pa.field("solo_top1_logit", pa.float32(), nullable=False),
    pa.field("solo_top2_logit", pa.float32(), nullable=False),
    pa.field("batched_top1_logit", pa.float32(), nullable=False),
    pa.field("batched_top2_logit", pa.float32(), nullable=False),
    pa.field("solo_margin", pa.float32(), nullable=False),
    pa.field("batched_margin", pa.float32(), nullable=False),
    pa.field("flip", pa.bool_(), nullable=False),
    # True while every earlier token of the row matched the reference (always True in sync).
    pa.field("prefix_match", pa.bool_(), nullable=False),
    # flip AND prefix_match: a flip whose prefix still matched the reference. In sync rows it
    # equals flip; in free rows it is True only at the step where the sequences part (flip
    # stays True after that wherever the tokens differ). SUM(first_divergence) counts
    # divergence events in both modes.
    pa.field("first_divergence", pa.bool_(), nullable=False),
    # max |reference logit - candidate logit| over the vocabulary; null where the two runs
    # saw different prefixes, in solo rows, or where a server returned only top logprobs.
    pa.field("max_abs_logit_diff", pa.float32(), nullable=True),
    # at a first_divergence row, where a threshold tau was given: "within_noise" (the
    # reference's margin < tau and the candidate took its runner-up: rounding can explain it)
    # or "anomalous"; null elsewhere (see mgaudit.audit.severity)
    pa.field("severity", pa.string(), nullable=True),
    # seeded sampling (null when greedy): the draw's identity, the prompt's draw seed and the
    # counter of this step's draw, and per side which margin was the smaller: "sample" (the gap
    # between the two best perturbed logits), "mask" (a top-k/top-p/min-p cut-off), "horizon" (both
    # at least the horizon the margin is resolved to; the margin then records the horizon)
    # in solo rows: the reference's best tokens at that step (id, logit or logprob), best first, where
    # its backend lists them (greedy steps): how far below its own token it put a candidate's
    # (mgaudit.audit.severity); null in the other rows
    pa.field("solo_alternatives", pa.list_(pa.struct([pa.field("token", pa.int64()),
                                                       pa.field("logit", pa.float32())])), nullable=True),
    pa.field("draw_seed", pa.int64(), nullable=True),
    pa.field("draw_counter", pa.int32(), nullable=True),
    pa.field("solo_margin_kind", pa.string(), nullable=True),
    pa.field("batched_margin_kind", pa.string(), nullable=True),
]
#: The sampling columns: null in greedy rows.
SAMPLING_COLUMNS = ("draw_seed", "draw_counter", "solo_margin_kind", "batched_margin_kind")
#: Columns a row may leave out (null): the sampling columns and the reference's alternatives.
OPTIONAL_COLUMNS = SAMPLING_COLUMNS + ("solo_alternatives",)
TRACE_SCHEMA = pa.schema(TRACE_FIELDS)
TRACE_COLUMNS = [f.name for f in TRACE_FIELDS]
MODES = ("solo", "sync", "free")


def _greedy_default(rows: Iterable[dict[str, Any]]) -> Iterable[dict[str, Any]]:
    """Rows built without the optional columns (greedy rows, no alternatives listed): those are null."""
    for r in rows:
        yield r if all(c in r for c in OPTIONAL_COLUMNS) else {**dict.fromkeys(OPTIONAL_COLUMNS), **r}


def rows_to_table(rows: Iterable[dict[str, Any]], provenance: dict[str, Any]) -> pa.Table:
    """Trace rows as a table (schema and metadata from :mod:`mgaudit.formats.parquet`)."""
    return parquet.table(_greedy_default(rows), TRACE_SCHEMA, SCHEMA_VERSION, provenance)


class _TraceWriter(parquet.TableWriter):
    def write(self, rows):
        return super().write(list(_greedy_default(rows)))


def trace_writer(path: Path, provenance: dict[str, Any]) -> parquet.TableWriter:
    """The writer of one trace file (see :class:`mgaudit.formats.parquet.TableWriter`)."""
    return _TraceWriter(path, TRACE_SCHEMA, SCHEMA_VERSION, provenance)


def trace_files(path: Path) -> list[Path]:
    """The Parquet files of a trace directory (or the file itself)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.glob("*.parquet") if not p.name.startswith((".", "_")))
    raise TraceError(f"{path}: no such trace file or directory", hint="give a directory written by `mgaudit scan`")


def is_mgaudit_trace(path: Path) -> bool:
    """True for a Parquet file that carries mgaudit's provenance in its schema metadata."""
    try:
        return PROVENANCE_KEY in parquet.read_metadata(path)
    except Exception:  # not Parquet, unreadable: not ours
        return False


def read_provenance(path: Path) -> dict[str, Any]:
    meta = parquet.read_metadata(path)
    if PROVENANCE_KEY not in meta:
        raise TraceError(f"{path}: no mgaudit provenance in the Parquet metadata",
                         hint="traces must be written by `mgaudit scan`")
    return json.loads(meta[PROVENANCE_KEY])


def read_traces(path: Path, columns: list[str] | None = None) -> tuple[pa.Table, dict[str, Any]]:
    """Read one trace directory (or file) into one table; check schema; return it with provenance.

    Raises TraceError for a missing path, no files, missing columns or files whose
    provenance names different models or dtypes.
    """
    files = trace_files(path)
    if not files:
        raise TraceError(f"{path}: no trace-*.parquet files", hint="scan prompts into this directory first (as its `out`)")
    tables, provenance = [], None
    wanted = columns or TRACE_COLUMNS
    for f in files:
        try:
            schema = pq.read_schema(f)
        except Exception as exc:  # pyarrow raises several types for non-Parquet input
            raise TraceError(f"{f}: not a Parquet file ({exc.__class__.__name__})") from exc
        missing = [c for c in wanted if c not in schema.names]
        if missing:
            raise TraceError(f"{f}: missing column(s) {', '.join(missing)}",
                             hint="traces must be written by this version of `mgaudit scan`; scan again")
        prov = read_provenance(f)
        if provenance is None:
            provenance = prov
        else:
            check_same_model(provenance, prov, str(f))
        tables.append(pq.read_table(f, columns=wanted))
    table = pa.concat_tables([t.replace_schema_metadata(None) for t in tables])
    return table, provenance or {}


def model_identity(prov: dict[str, Any]) -> tuple:
    model = prov.get("model", {})
    return (model.get("name"), model.get("sha256"), model.get("dtype"))


def check_same_model(a: dict[str, Any], b: dict[str, Any], where: str) -> None:
    if model_identity(a) != model_identity(b):
        ma, mb = a.get("model", {}), b.get("model", {})
        raise TraceError(
            f"{where}: traces of different models or dtypes are mixed "
            f"({ma.get('name')} {ma.get('dtype')} vs {mb.get('name')} {mb.get('dtype')})",
            hint="calibrate on traces of one model and dtype",
        )


# --------------------------------------------------------------------------- row builders


NAN = float("nan")

#: ``severity(reference, candidate, step) -> "within_noise" | "anomalous" | None`` for a divergence.
SeverityFn = Callable[[Any, Any, int], "str | None"]


@dataclass(frozen=True)
class RowKey:
    """Where a run sits: the columns every row of one (prompt, condition) comparison shares."""

    prompt_id: str
    prompt_index: int
    prompt_len: int
    condition: str = "alone"
    batch_size: int = 1
    round: int = 0
    batch_index: int = 0
    row: int = 0
    pad_len: int = 0
    draw_seed: int | None = None  # seeded sampling: the prompt's draw seed (the counter is the step)

    def columns(self) -> dict[str, Any]:
        return {"prompt_id": self.prompt_id, "prompt_index": self.prompt_index, "condition": self.condition,
                "batch_size": self.batch_size, "round": self.round, "batch_index": self.batch_index,
                "row": self.row, "pad_len": self.pad_len, "prompt_len": self.prompt_len}


def _kind(run, t: int) -> str | None:
    kind = getattr(run, "kind", None)
    return kind[t] if kind is not None and t < len(kind) else None


def _draw(key: RowKey, t: int) -> dict[str, Any]:
    return {"draw_seed": key.draw_seed, "draw_counter": None if key.draw_seed is None else t}


def solo_rows(key: RowKey, r) -> list[dict[str, Any]]:
    """Rows of a reference run (``r`` has ``tokens``, ``runner_up``, ``top1``, ``top2``), batched = solo."""
    rows = []
    base = key.columns()
    for t in range(len(r.tokens)):
        m = r.top1[t] - r.top2[t]
        kind = _kind(r, t)
        rows.append({
            **base, "mode": "solo", "step": t,
            "solo_token": r.tokens[t], "batched_token": r.tokens[t],
            "solo_runner_up": r.runner_up[t], "batched_runner_up": r.runner_up[t],
            "solo_top1_logit": r.top1[t], "solo_top2_logit": r.top2[t],
            "batched_top1_logit": r.top1[t], "batched_top2_logit": r.top2[t],
            "solo_margin": m, "batched_margin": m, "flip": False, "prefix_match": True, "first_divergence": False,
            "max_abs_logit_diff": None, "severity": None, **_draw(key, t),
            "solo_margin_kind": kind, "batched_margin_kind": kind, "solo_alternatives": _alternatives(r, t),
        })
    return rows


def _alternatives(r, t: int) -> list[dict[str, Any]] | None:
    alts = getattr(r, "alternatives", None)
    if alts is None or t >= len(alts) or not alts[t]:
        return None
    return [{"token": int(i), "logit": float(v)} for i, v in alts[t]]


def pair_rows(mode: str, key: RowKey, solo, batched, severity: SeverityFn | None = None) -> list[dict[str, Any]]:
    """Rows comparing a reference run with a candidate run, step by step.

    ``free``: over both sequences; past the end of one side (it emitted EOS earlier) its token
    is -1 and its logits NaN, so ``flip`` stays ``solo_token != batched_token``. ``sync``: the
    candidate was teacher-forced on the reference's tokens; one row per step it scored (a
    server that cannot be scored past a divergence gives fewer steps than the reference).
    ``max_abs_logit_diff`` comes from ``batched.max_abs_diff`` where the run recorded it.
    ``severity`` classifies each first divergence (see :data:`SeverityFn`).
    """
    diffs = getattr(batched, "max_abs_diff", None)
    base = key.columns()
    rows = []
    prefix = True
    steps = len(batched.tokens) if mode == "sync" else max(len(solo.tokens), len(batched.tokens))
    for t in range(steps):
        s_ok, b_ok = t < len(solo.tokens), t < len(batched.tokens)
        st = solo.tokens[t] if s_ok else -1
        bt = batched.tokens[t] if b_ok else -1
        s1, s2 = (solo.top1[t], solo.top2[t]) if s_ok else (NAN, NAN)
        b1, b2 = (batched.top1[t], batched.top2[t]) if b_ok else (NAN, NAN)
        flip, matched = st != bt, prefix and s_ok and b_ok
        first = flip and matched
        rows.append({
            **base, "mode": mode, "step": t,
            "solo_token": st, "batched_token": bt,
            "solo_runner_up": solo.runner_up[t] if s_ok else -1,
            "batched_runner_up": batched.runner_up[t] if b_ok else -1,
            "solo_top1_logit": s1, "solo_top2_logit": s2, "batched_top1_logit": b1, "batched_top2_logit": b2,
            "solo_margin": s1 - s2, "batched_margin": b1 - b2, "flip": flip,
            "prefix_match": matched, "first_divergence": first,
            "max_abs_logit_diff": diffs[t] if (diffs is not None and b_ok and t < len(diffs) and prefix) else None,
            "severity": severity(solo, batched, t) if (first and severity is not None) else None,
            **_draw(key, t), "solo_margin_kind": _kind(solo, t) if s_ok else None,
            "batched_margin_kind": _kind(batched, t) if b_ok else None, "solo_alternatives": None,
        })
        if mode != "sync":  # teacher forcing keeps the prefixes equal
            prefix = prefix and st == bt
    return rows


def first_divergence(solo: list[int], other: list[int]) -> int | None:
    """The first step where two token sequences differ (a shorter one differs where it ends); None if equal."""
    first = next((i for i in range(min(len(solo), len(other))) if solo[i] != other[i]), None)
    if first is None and len(solo) != len(other):
        first = min(len(solo), len(other))
    return first
