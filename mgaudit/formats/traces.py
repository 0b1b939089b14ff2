"""Trace files: the Parquet schema scan writes, atomic writes, and reading back.

A trace directory holds ``trace-*.parquet`` files that share one explicit schema,
so pandas (``pd.read_parquet(dir)``), DuckDB (``read_parquet('dir/*.parquet')``),
Spark or ``pyarrow.dataset`` open it without mgaudit. Provenance travels as JSON
in the schema metadata of every file. Non-Parquet files written beside them
(``_summary.json``, ``_scan.json``) start with ``_`` so that Parquet readers skip
them.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq

from ..errors import OutputError, TraceError
from . import parquet
from .parquet import PROVENANCE_KEY

SCHEMA_VERSION = "2"  # 2: the first_divergence column

#: One row per (prompt, batch size, mode, step). ``mode`` is "solo" (the batch-1
#: reference itself: batched_* repeat solo_*), "sync" (the batched run is fed the
#: solo tokens, so both sides see the same prefix) or "free" (the batched run feeds
#: its own tokens).
TRACE_FIELDS: list[pa.Field] = [
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("prompt_index", pa.int32(), nullable=False),
    pa.field("batch_size", pa.int32(), nullable=False),
    pa.field("mode", pa.string(), nullable=False),
    pa.field("batch_index", pa.int32(), nullable=False),  # which batch of the set
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
    # True while every earlier token of the row matched solo (always True in sync).
    pa.field("prefix_match", pa.bool_(), nullable=False),
    # flip AND prefix_match: a flip whose prefix still matched solo. In sync rows it
    # equals flip; in free rows it is True only at the step where the sequences part
    # (flip stays True after that wherever the tokens differ). SUM(first_divergence)
    # counts divergence events in both modes.
    pa.field("first_divergence", pa.bool_(), nullable=False),
    # max |solo logit - batched logit| over the vocabulary; null where the two
    # runs saw different prefixes (free mode after a divergence) or in solo rows.
    pa.field("max_abs_logit_diff", pa.float32(), nullable=True),
]
TRACE_SCHEMA = pa.schema(TRACE_FIELDS)
TRACE_COLUMNS = [f.name for f in TRACE_FIELDS]
#: Columns that schema version 1 lacked; reading derives them.
DERIVED_COLUMNS = ("first_divergence",)
MODES = ("solo", "sync", "free")
#: Temporary files of atomic writes: ``.tmp-<name>.<random>.partial`` - no ``*.parquet``
#: or ``*.json`` glob matches them, and a resumed scan deletes leftovers.
TMP_PREFIX = ".tmp-"
TMP_SUFFIX = ".partial"


def _first_divergence(rows: list[dict[str, Any]], columns: dict[str, list]) -> None:
    columns["first_divergence"] = [r["first_divergence"] if "first_divergence" in r
                                   else bool(r["flip"] and r["prefix_match"]) for r in rows]


def rows_to_table(rows: Iterable[dict[str, Any]], provenance: dict[str, Any]) -> pa.Table:
    """Trace rows as a table (schema and metadata from :mod:`mgaudit.formats.parquet`)."""
    return parquet.table(rows, TRACE_SCHEMA, SCHEMA_VERSION, provenance, derive=_first_divergence)


def trace_writer(path: Path, provenance: dict[str, Any]) -> parquet.TableWriter:
    """The writer of one trace file (see :class:`mgaudit.formats.parquet.TableWriter`)."""
    return parquet.TableWriter(path, TRACE_SCHEMA, SCHEMA_VERSION, provenance, derive=_first_divergence)


def _open_new(path: Path) -> int:
    """Create ``path`` exclusively with mode 0666 minus the umask (``mkstemp`` would give 0600)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)


def temp_path(path: Path) -> Path:
    return path.parent / f"{TMP_PREFIX}{path.name}.{secrets.token_hex(4)}{TMP_SUFFIX}"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder, then rename.

    The temp file is named ``.tmp-<name>.<random>.partial`` (see TMP_SUFFIX) and the
    result has the usual permissions (0666 minus the umask).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(path)
        fd = _open_new(tmp)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}",
                          hint="choose a writable location") from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_write_table(path: Path, table: pa.Table) -> None:
    """Write a Parquet file (zstd) atomically: temp file in the target folder, then rename."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    atomic_write_bytes(Path(path), sink.getvalue().to_pybytes())


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
        meta = pq.read_schema(path).metadata or {}
    except Exception:  # not Parquet, unreadable: not ours
        return False
    return PROVENANCE_KEY in meta


def stale_temp_files(folder: Path) -> list[Path]:
    """Temp files an interrupted write left in ``folder`` (this version's ``.partial`` and the older
    ``.tmp-*.parquet``/``.tmp-*.json`` of mkstemp)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith(TMP_PREFIX) and p.is_file()
                  and p.name.endswith((TMP_SUFFIX, ".parquet", ".json")))


def _probe_dir(folder: Path) -> str | None:
    """Why ``folder`` (an existing directory) cannot take a new file, or None where it can."""
    probe = folder / f"{TMP_PREFIX}write-test.{os.getpid()}.{secrets.token_hex(3)}{TMP_SUFFIX}"
    try:
        os.close(_open_new(probe))
        os.unlink(probe)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output_dir(path: Path, what: str) -> None:
    """Raise OutputError unless ``path`` is (or can be created as) a writable directory.

    Creates nothing: only a probe file in the nearest existing folder, removed at once.
    ``what`` names the output in the message ("trace directory", ...).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path}: exists and is not a directory", hint="give a directory path")
    base = _nearest_existing(path)
    if not base.is_dir():
        raise OutputError(f"{what} {path}: {base} is a file, not a directory", hint="give a path under a directory")
    why = _probe_dir(base)
    if why:
        raise OutputError(f"{what} {path}: {base} is not writable ({why})", hint="choose a writable location")


def check_output_file(path: Path, what: str) -> None:
    """Raise OutputError unless a file can be written at ``path`` (its folder may not exist yet)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{what} {path}: is a directory", hint="give a file path")
    base = _nearest_existing(path.parent)
    if not base.is_dir():
        raise OutputError(f"{what} {path}: {base} is a file, not a directory", hint="give a path under a directory")
    why = _probe_dir(base)
    if why:
        raise OutputError(f"{what} {path}: {base} is not writable ({why})", hint="choose a writable location")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"{what} {path}: the file exists and is read-only", hint="choose a writable location")


def read_provenance(path: Path) -> dict[str, Any]:
    schema = pq.read_schema(path)
    meta = schema.metadata or {}
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
    for f in files:
        try:
            schema = pq.read_schema(f)
        except Exception as exc:  # pyarrow raises several types for non-Parquet input
            raise TraceError(f"{f}: not a Parquet file ({exc.__class__.__name__})") from exc
        wanted = columns or TRACE_COLUMNS
        missing = [c for c in wanted if c not in schema.names and c not in DERIVED_COLUMNS]
        if missing:
            raise TraceError(f"{f}: missing column(s) {', '.join(missing)}",
                             hint="traces must be written by `mgaudit scan`")
        prov = read_provenance(f)
        if provenance is None:
            provenance = prov
        else:
            check_same_model(provenance, prov, str(f))
        derive = [c for c in wanted if c not in schema.names]
        stored = [c for c in wanted if c in schema.names]
        if derive:
            stored += [c for c in ("flip", "prefix_match") if c not in stored]
        t = pq.read_table(f, columns=stored)
        if derive:  # schema version 1: first_divergence = flip AND prefix_match
            fd = pa.compute.and_(t["flip"], t["prefix_match"])
            t = t.append_column(pa.field("first_divergence", pa.bool_(), nullable=False), fd)
        tables.append(t.select(wanted))
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


def solo_rows(pid: str, index: int, plen: int, r) -> list[dict[str, Any]]:
    """Rows of a solo reference (``r`` has ``tokens``, ``runner_up``, ``top1``, ``top2``), batched = solo."""
    rows = []
    for t in range(len(r)):
        m = r.top1[t] - r.top2[t]
        rows.append({
            "prompt_id": pid, "prompt_index": index, "batch_size": 1, "mode": "solo", "batch_index": index,
            "row": 0, "pad_len": 0, "prompt_len": plen, "step": t,
            "solo_token": r.tokens[t], "batched_token": r.tokens[t],
            "solo_runner_up": r.runner_up[t], "batched_runner_up": r.runner_up[t],
            "solo_top1_logit": r.top1[t], "solo_top2_logit": r.top2[t],
            "batched_top1_logit": r.top1[t], "batched_top2_logit": r.top2[t],
            "solo_margin": m, "batched_margin": m, "flip": False, "prefix_match": True, "first_divergence": False,
            "max_abs_logit_diff": None,
        })
    return rows


def pair_rows(mode, pid, index, bsz, group, row, pad_len, plen, solo, batched) -> list[dict[str, Any]]:
    """Rows comparing a solo trace with a batched one, step by step.

    Past the end of one side (it emitted EOS earlier) its token is -1 and its
    logits NaN, so ``flip`` stays ``solo_token != batched_token``. ``max_abs_logit_diff`` comes
    from ``batched.max_abs_diff`` where the run recorded it (an endpoint cannot: None).
    """
    diffs = getattr(batched, "max_abs_diff", None)
    rows = []
    prefix = True
    for t in range(max(len(solo), len(batched))):
        s_ok, b_ok = t < len(solo), t < len(batched)
        st = solo.tokens[t] if s_ok else -1
        bt = batched.tokens[t] if b_ok else -1
        s1, s2 = (solo.top1[t], solo.top2[t]) if s_ok else (NAN, NAN)
        b1, b2 = (batched.top1[t], batched.top2[t]) if b_ok else (NAN, NAN)
        flip, matched = st != bt, prefix and s_ok and b_ok
        rows.append({
            "prompt_id": pid, "prompt_index": index, "batch_size": bsz, "mode": mode, "batch_index": group,
            "row": row, "pad_len": pad_len, "prompt_len": plen, "step": t,
            "solo_token": st, "batched_token": bt,
            "solo_runner_up": solo.runner_up[t] if s_ok else -1,
            "batched_runner_up": batched.runner_up[t] if b_ok else -1,
            "solo_top1_logit": s1, "solo_top2_logit": s2, "batched_top1_logit": b1, "batched_top2_logit": b2,
            "solo_margin": s1 - s2, "batched_margin": b1 - b2, "flip": flip,
            "prefix_match": matched, "first_divergence": flip and matched,
            "max_abs_logit_diff": diffs[t] if (diffs is not None and b_ok and prefix) else None,
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
