"""Fit the gate threshold tau from scan traces.

The gate rule is *verify a step when ``batched_margin < tau``* (strict). Only
synchronous rows (``mode == "sync"``) are used: there the batched run is fed the
solo tokens, so both sides see the same prefix and a flip is caused by the batch
alone, never by an earlier divergence.

Two ways to fit tau:

``recall``
    The smallest tau under which at least ``target_recall`` of the observed flips
    satisfy ``batched_margin < tau``, plus ``safety`` logits. The default safety,
    0.0625, is one bf16 rounding step (ulp) for logits of magnitude 8 to 16, the
    usual range of top logits: a flip that lands one quantum above the largest
    margin seen in calibration is still caught.

``bound``
    ``B`` = the ``bound_quantile`` quantile of ``max_abs_logit_diff`` (the largest
    change of any logit between solo and batched) over the sync rows, and
    ``tau = bound_factor * B``. A flip needs the two top logits to move against
    each other by more than the margin; each moves by at most ``B``, so every
    flip whose perturbation stays within the bound has margin < 2B. This needs no
    flips at all, and adds no safety (the factor already is the margin).

Both taus are always computed (where the data allow) and reported; ``method``
picks the one that becomes the threshold. Everything here is numpy/pyarrow only.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import __version__
from .errors import NoFlipsError, OutputError, TraceError, UsageError
from .formats.gate import GATE_FORMAT, GATE_VERSION, METRIC, RULE, float32_decimal, float32_up, write_gate
from .formats.files import check_output_file
from .formats.traces import check_same_model, read_traces, trace_files
from .stats import interval95

METHODS = ("recall", "bound")

#: One bf16 quantum (ulp) for logits in [8, 16): bf16 keeps 8 significant bits.
DEFAULT_SAFETY = 0.0625
#: Fixed points always in the candidate grid, besides the flip margins and the fitted taus.
GRID_POINTS = (0.0, 0.0625, 0.125, 0.25, 0.5, 1.0, 2.0)
#: At most this many flip margins enter the candidate grid (evenly spaced by rank).
MAX_FLIP_CANDIDATES = 40
#: Below this many flips a recall figure says little (at 30 of 30 the 95 % interval is still
#: about [89 %, 100 %]): calibrate warns, in its output and in gate.json.
MIN_FLIPS = 30


@dataclass
class CalibrateConfig:
    traces: list[Path]
    out: Path | None = None
    method: str = "recall"
    target_recall: float = 1.0
    safety: float = DEFAULT_SAFETY  # logits added to the recall fit; see module doc
    bound_quantile: float = 0.999
    bound_factor: float = 2.0
    eval_traces: list[Path] = field(default_factory=list)
    plot: Path | None = None
    batch_sizes: list[int] | None = None  # keep only these batch sizes (None: all)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise UsageError(f"`method` must be one of {', '.join(METHODS)}, not {self.method!r}")
        if not _finite(self.target_recall) or not 0.0 < self.target_recall <= 1.0:
            raise UsageError(f"`target_recall` must be in (0, 1], not {self.target_recall}")
        if not _finite(self.safety) or self.safety < 0.0:
            raise UsageError(f"`safety` must be a finite number >= 0, not {self.safety}")
        if not _finite(self.bound_quantile) or not 0.0 < self.bound_quantile <= 1.0:
            raise UsageError(f"`bound_quantile` must be in (0, 1], not {self.bound_quantile}")
        if not _finite(self.bound_factor) or self.bound_factor <= 0.0:
            raise UsageError(f"`bound_factor` must be a finite number > 0, not {self.bound_factor}")
        if self.batch_sizes is not None and any(int(b) < 1 for b in self.batch_sizes):
            raise UsageError(f"`batch_size` values must be >= 1, not {list(self.batch_sizes)}")
        if not self.traces:
            raise TraceError("no trace paths given", hint="give one or more directories written by `mgaudit scan`")
        for flag, p in (("`out`", self.out), ("`plot`", self.plot)):
            if p is not None and Path(p).is_dir():
                raise OutputError(f"{flag} {p} is a directory", hint=f"give a file path such as {Path(p) / _default_name(flag)}")
        for what, p in (("gate file", self.out), ("plot file", self.plot)):
            if p is not None:
                check_output_file(Path(p), what)
        _refuse_duplicates(self.traces, "trace path")
        _refuse_duplicates(self.eval_traces, "evaluation trace path")

    def parameters(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "target_recall": self.target_recall,
            "safety": self.safety,
            "bound_quantile": self.bound_quantile,
            "bound_factor": self.bound_factor,
            "batch_sizes": sorted(int(b) for b in self.batch_sizes) if self.batch_sizes else None,
            "mode": "sync",
        }


@dataclass
class CalibrationResult:
    threshold: float
    method: str
    recall_tau: float | None  # None where the traces hold no flips
    bound_tau: float | None  # None where no max_abs_logit_diff is recorded
    figures: dict[str, Any]  # figures_at(table, threshold)
    candidates: list[dict[str, Any]]
    transfer: list[dict[str, Any]]  # one per eval trace path
    traces: list[str]
    provenance: dict[str, Any]
    parameters: dict[str, Any]
    fit: dict[str, Any]  # the raw quantities the taus come from
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    warnings: list[str] = field(default_factory=list)  # e.g. too few flips for the recall to mean much

    def to_dict(self) -> dict[str, Any]:
        """Everything, as JSON types; thresholds as their shortest float32 decimals."""
        d = asdict(self)
        for k in ("threshold", "recall_tau", "bound_tau"):
            if d[k] is not None:
                d[k] = float32_decimal(d[k])
        return _jsonable(d)

    def to_gate_json(self, base: Path | None = None) -> dict[str, Any]:
        """The gate file. ``base``: the folder gate.json goes to; trace paths are stored relative to it
        (with a content hash), so a committed gate carries no local absolute paths."""
        def where(p: str) -> str:
            return relative_to(p, base) if base is not None else str(p)

        def dec(x: Any) -> Any:
            return float32_decimal(x) if isinstance(x, float) and math.isfinite(x) else x

        provenance = json.loads(json.dumps(self.provenance, default=str))
        config = provenance.get("config") or {}
        if base is not None and config.get("out"):
            config["out"] = where(config["out"])
        return _jsonable({
            "format": GATE_FORMAT,
            "version": GATE_VERSION,
            "threshold": float32_decimal(self.threshold),
            "metric": METRIC,
            "rule": RULE,
            "method": self.method,
            "parameters": self.parameters,
            "calibration": {k: self.figures[k] for k in
                            ("steps", "flips", "flip_rate", "flip_rate_ci95", "flips_covered", "recall",
                             "recall_ci95", "triggered", "trigger_rate", "trigger_rate_ci95", "flips_missed",
                             "per_batch_size")},
            "warnings": list(self.warnings),
            "alternatives": {"recall": dec(self.recall_tau), "bound": dec(self.bound_tau)},
            "fit": {k: dec(v) for k, v in self.fit.items()},
            "transfer": [{**t, "traces": where(t["traces"])} for t in self.transfer],
            "traces": [{"path": where(t), **traces_digest(Path(t))} for t in self.traces],
            "provenance": provenance,
            "created": self.created,
            "mgaudit_version": __version__,
        })


# --------------------------------------------------------------------------- loading


def load_traces(paths: Sequence[Path], batch_sizes: Iterable[int] | None = None,
                reference: dict[str, Any] | None = None) -> tuple[pa.Table, dict[str, Any], str]:
    """Read trace paths into one table of their sync rows.

    Returns (sync table, provenance of the first path, a label naming the paths).
    ``reference``: provenance the traces must match (model and dtype).
    """
    if not paths:
        raise TraceError("no trace paths given", hint="give one or more directories written by `mgaudit scan`")
    tables, provenance = [], reference
    for p in paths:
        table, prov = read_traces(Path(p))
        if table.num_rows == 0:
            raise TraceError(f"{p}: the trace files hold no rows", hint="the scan wrote nothing; rerun it")
        if (prov.get("endpoint") or {}).get("tokens_only"):  # endpoint scans of servers without logprobs
            raise TraceError(f"{p}: recorded with tokens only (no logprobs, so no margins): nothing to fit a gate on",
                             hint="scan a server that returns logprobs")
        if prov.get("endpoint") and ((prov.get("config") or {}).get("temperature") or 0) > 0:
            raise TraceError(f"{p}: sampled on a server, whose random draws are unknown: no sampling margins to fit "
                             "a gate on", hint="calibrate on greedy server scans, or on local sampled scans")
        if provenance is None:
            provenance = prov
        else:
            check_same_model(provenance, prov, str(p))
        tables.append(table)
    label = ", ".join(str(p) for p in paths)
    table = pa.concat_tables(tables)
    table = table.filter(pc.equal(table["mode"], "sync"))
    if table.num_rows == 0:
        raise TraceError(f"{label}: no synchronous (mode == \"sync\") steps",
                         hint="calibration needs the teacher-forced sync rows that `mgaudit scan` writes")
    if batch_sizes:
        keep = sorted({int(b) for b in batch_sizes})
        table = table.filter(pc.is_in(table["batch_size"], value_set=pa.array(keep, pa.int32())))
        if table.num_rows == 0:
            raise TraceError(f"{label}: no synchronous steps at batch size(s) {', '.join(map(str, keep))}",
                             hint="check `batch_size` against the batch sizes scanned")
    return table, provenance or {}, label


def _columns(table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    margin = table["batched_margin"].to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    flip = table["flip"].to_numpy(zero_copy_only=False).astype(bool, copy=False)
    bs = table["batch_size"].to_numpy(zero_copy_only=False)
    return margin, flip, bs


# --------------------------------------------------------------------------- fitting


def just_above(x: float) -> float:
    """The next float32 above ``x`` as a Python float: ``x < just_above(x)`` in float32 and float64."""
    return float(np.nextafter(np.float32(x), np.float32(np.inf)))


def fit_recall(margins: np.ndarray, flips: np.ndarray, target_recall: float) -> tuple[float, float]:
    """Smallest tau with ``mean(margin[flip] < tau) >= target_recall``; returns (tau, margin it sits above).

    Raises ValueError where there are no flips.
    """
    m = np.sort(np.asarray(margins, dtype=np.float32)[np.asarray(flips, dtype=bool)])
    if m.size == 0:
        raise ValueError("no flips")
    # k flips must be covered; the small slack keeps e.g. 0.9 * 10 from becoming 9.000000001 -> 10
    k = min(m.size, max(1, math.ceil(target_recall * m.size - 1e-9)))
    edge = float(m[k - 1])
    return just_above(edge), edge


def fit_bound(max_abs_diff: np.ndarray, quantile: float, factor: float) -> tuple[float, float]:
    """``factor * quantile(max_abs_logit_diff)``; returns (tau, B). ValueError where nothing is recorded."""
    d = np.asarray(max_abs_diff, dtype=np.float64)
    d = d[np.isfinite(d)]
    if d.size == 0:
        raise ValueError("no max_abs_logit_diff")
    b = float(np.quantile(d, quantile))
    return float(factor * b), b


# --------------------------------------------------------------------------- figures


def _counts(margins: np.ndarray, flips: np.ndarray, tau: float) -> dict[str, Any]:
    below = margins < np.float64(tau)
    steps, nflips = int(margins.size), int(flips.sum())
    covered, triggered = int((below & flips).sum()), int(below.sum())
    return {
        "steps": steps,
        "flips": nflips,
        "flip_rate": nflips / steps if steps else None,
        "flip_rate_ci95": interval95(nflips, steps),
        "flips_covered": covered,
        "flips_missed": nflips - covered,
        "recall": covered / nflips if nflips else None,
        "recall_ci95": interval95(covered, nflips),
        "triggered": triggered,
        "trigger_rate": triggered / steps if steps else None,
        "trigger_rate_ci95": interval95(triggered, steps),
    }


def figures_at(table: pa.Table, tau: float, per_batch_size: bool = True) -> dict[str, Any]:
    """Gate figures of ``tau`` on a table of sync rows, overall and (optionally) per batch size.

    recall is None where there are no flips; per_batch_size is keyed by the batch
    size as a string (JSON keys).
    """
    margins, flips, bs = _columns(table)
    out = {"tau": float(tau), **_counts(margins, flips, tau)}
    if per_batch_size:
        out["per_batch_size"] = {
            str(int(b)): _counts(margins[bs == b], flips[bs == b], tau) for b in np.unique(bs)
        }
    return out


def candidate_taus(margins: np.ndarray, flips: np.ndarray, extra: Iterable[float | None] = ()) -> list[float]:
    """The tau grid: fixed points, just above each distinct flip margin (at most
    MAX_FLIP_CANDIDATES of them, evenly spaced by rank, the largest always kept) and ``extra``."""
    fm = np.unique(np.asarray(margins, dtype=np.float32)[np.asarray(flips, dtype=bool)])
    if fm.size > MAX_FLIP_CANDIDATES:
        fm = fm[np.unique(np.linspace(0, fm.size - 1, MAX_FLIP_CANDIDATES).round().astype(int))]
    grid = set(GRID_POINTS) | {just_above(x) for x in fm} | {float(x) for x in extra if x is not None}
    return sorted(grid)


def candidate_table(table: pa.Table, taus: Iterable[float]) -> list[dict[str, Any]]:
    """For each tau: recall, trigger rate, flips covered and missed on the table."""
    margins, flips, _ = _columns(table)
    sorted_all = np.sort(margins.astype(np.float64))
    sorted_flip = np.sort(margins[flips].astype(np.float64))
    steps, nflips = sorted_all.size, sorted_flip.size
    rows = []
    for tau in taus:
        covered = int(np.searchsorted(sorted_flip, tau, side="left"))  # count of margins < tau
        triggered = int(np.searchsorted(sorted_all, tau, side="left"))
        rows.append({
            "tau": float(tau),
            "recall": covered / nflips if nflips else None,
            "trigger_rate": triggered / steps if steps else None,
            "flips_covered": covered,
            "flips_missed": nflips - covered,
        })
    return rows


# --------------------------------------------------------------------------- the job


def calibrate(config: CalibrateConfig) -> CalibrationResult:
    """Fit tau from ``config.traces``; report transfer to ``config.eval_traces``; write gate.json and plot."""
    config.validate()
    table, provenance, label = load_traces(config.traces, config.batch_sizes)
    margins, flips, _ = _columns(table)
    nflips = int(flips.sum())

    fit: dict[str, Any] = {"flip_margin_max": float(margins[flips].max()) if nflips else None}
    recall_tau = bound_tau = None
    if nflips:
        raw, edge = fit_recall(margins, flips, config.target_recall)
        recall_tau = float32_up(raw + config.safety)
        fit.update(recall_fit=raw, recall_edge_margin=edge)
    elif config.method == "recall":
        raise NoFlipsError(
            f"no flips in {margins.size} synchronous steps of {label}: nothing to fit; scan more prompts, "
            "more tokens or larger batch sizes, or use `method` bound", steps=int(margins.size), label=str(label))
    diff = table["max_abs_logit_diff"].to_numpy(zero_copy_only=False)
    try:
        bound_tau, b = fit_bound(np.asarray(diff, dtype=np.float64), config.bound_quantile, config.bound_factor)
        bound_tau = float32_up(bound_tau)
        fit.update(bound_B=b)
    except ValueError:
        if config.method == "bound":
            raise TraceError(f"{label}: no max_abs_logit_diff recorded in the synchronous steps: "
                             "cannot fit `method` bound", hint="use `method` recall") from None

    threshold = recall_tau if config.method == "recall" else bound_tau
    assert threshold is not None
    figures = figures_at(table, threshold)
    candidates = candidate_table(table, candidate_taus(margins, flips, (recall_tau, bound_tau, threshold)))

    transfer = []
    for p in config.eval_traces:
        etable, _, _ = load_traces([p], config.batch_sizes, reference=provenance)
        transfer.append({"traces": str(p), **figures_at(etable, threshold)})

    result = CalibrationResult(
        threshold=float(threshold),
        method=config.method,
        recall_tau=recall_tau,
        bound_tau=bound_tau,
        figures=figures,
        candidates=candidates,
        transfer=transfer,
        traces=[str(p) for p in config.traces],
        provenance=provenance,
        parameters=config.parameters(),
        fit=fit,
        warnings=[w for w in (few_flips_warning(figures["flips"], figures["flips_covered"]),) if w],
    )
    if config.plot is not None:
        from .plots import plot_calibration

        plot_calibration(result, table, Path(config.plot))
    if config.out is not None:
        write_gate(Path(config.out), result.to_gate_json(base=Path(config.out).parent))
    return result


# --------------------------------------------------------------------------- gate files


# --------------------------------------------------------------------------- helpers


def _refuse_duplicates(paths: Sequence[Path], what: str) -> None:
    """The same traces given twice would count their steps twice."""
    seen: dict[Path, Path] = {}
    for p in paths:
        path = Path(p)
        try:
            files = [f.resolve() for f in trace_files(path)] if path.exists() else [path.resolve()]
        except TraceError:
            files = [path.resolve()]
        for f in files:
            if f in seen:
                same = "the same path" if seen[f].resolve() == path.resolve() else f"{seen[f]} holds it too"
                raise UsageError(f"{what} {p} is given twice ({same}): its steps would be counted twice",
                                 hint="give each trace directory once")
            seen[f] = path


def few_flips_warning(flips: int, covered: int) -> str | None:
    """The warning for a fit on fewer than MIN_FLIPS flips, or None."""
    if flips >= MIN_FLIPS:
        return None
    if flips == 0:
        return (f"no flips in the calibration traces: tau is not checked against any flip; "
                f"scan more prompts, tokens or batch sizes until there are at least {MIN_FLIPS}")
    lo, hi = interval95(covered, flips)
    return (f"only {flips} flips: recall {100.0 * covered / flips:.0f}% has a 95% interval of "
            f"[{100 * lo:.0f}%, {100 * hi:.0f}%]; scan more prompts, tokens or batch sizes until there are "
            f"at least {MIN_FLIPS} flips for a recall that means much")


def relative_to(path: Path | str, base: Path) -> str:
    """``path`` relative to the folder ``base`` (POSIX separators), as gate.json stores trace paths."""
    return Path(os.path.relpath(Path(path).resolve(), Path(base).resolve())).as_posix()


def traces_digest(path: Path) -> dict[str, Any]:
    """Names and a content hash of a trace directory's files: which traces a gate came from."""
    h = hashlib.sha256()
    files = trace_files(Path(path))
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return {"files": len(files), "sha256": h.hexdigest()}


def _finite(x: Any) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def _default_name(flag: str) -> str:
    return "gate.json" if flag == "`out`" else "calibration.png"


def _jsonable(obj: Any) -> Any:
    """Plain JSON types: numpy scalars to Python, non-finite floats to None, keys to str."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    return obj
