"""The trace directory of a scan: one implementation for every backend.

``DIR/trace-*.parquet`` (the units: each written atomically when done), ``DIR/_scan.json`` (the
manifest: the fingerprint a resumed scan must match, the batch sizes covered, the provenance)
and ``DIR/_summary.json``. The rules:

* before any model or server work, ``--out`` is checked: a writable directory, no Parquet file
  there that mgaudit did not write (never read as a trace, never deleted), and no earlier scan
  unless resuming or overwriting;
* ``overwrite`` deletes only what an earlier scan wrote (trace files carrying mgaudit's
  provenance, the manifest, the summary and a sweep's card);
* ``resume`` refuses a scan made with other options (naming them), keeps its complete unit
  files and deletes the temporary files an interrupted write left.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import OutputError
from ..formats.card import FILES as CARD_FILES
from ..formats.files import atomic_write_json, check_output_dir, make_dir, stale_temp_files
from ..formats.traces import is_mgaudit_trace, read_provenance, trace_files, trace_writer
from .steps import Steps

MANIFEST = "_scan.json"
SUMMARY = "_summary.json"


@dataclass
class Unit:
    """One trace file's worth of work: the reference runs of a chunk of prompts, or one group of
    prompts run together under a condition."""

    path: Path
    kind: str  # "reference" or "candidate"
    condition: Any = None  # a Condition (candidate units)
    group: int = 0
    members: list[int] = field(default_factory=list)  # request positions
    owned: int = 0  # the first ``owned`` members are recorded (a short group is filled up)
    variant: str = ""  # which form of the prompts its requests are (a sweep's long prompts, another route)


def unit_name(kind: str, level: int, group: int, round: int = 0, variant: str = "") -> str:
    """``trace-solo-0000`` (reference runs), ``trace-alone-0000`` (a candidate alone),
    ``trace-cache-0000`` (warm cache), ``trace-b0004-g0000`` (a group of 4 sent together),
    ``trace-s0004-g0000`` (4 staggered); then ``-<variant>`` and ``-r<round>`` where set."""
    suffix = (f"-{variant}" if variant else "") + (f"-r{round:02d}" if round else "")
    if kind == "reference":
        return f"trace-solo-{group:04d}{suffix}.parquet"
    if kind in ("alone", "warm-cache"):
        return f"trace-{'alone' if kind == 'alone' else 'cache'}-{group:04d}{suffix}.parquet"
    return f"trace-{'s' if kind == 'staggered' else 'b'}{level:04d}-g{group:04d}{suffix}.parquet"


class TraceDir:
    def __init__(self, path: Path):
        self.path = Path(path)

    # ------------------------------------------------------------------ before any work

    def check(self, resume: bool, overwrite: bool) -> None:
        """Check ``out`` changing nothing (see the module doc)."""
        out = self.path
        check_output_dir(out, "`out`")
        if not out.is_dir():
            return
        parquet = trace_files(out)
        foreign = [f for f in parquet if not (f.name.startswith("trace-") and is_mgaudit_trace(f))]
        if foreign:
            names = ", ".join(f.name for f in foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5
                                                              else "")
            raise OutputError(f"{out} holds {len(foreign)} Parquet file(s) that mgaudit did not write ({names}); "
                              "they would be read as traces and are never deleted",
                              hint="move them elsewhere or choose another directory for the traces")
        if parquet and not (resume or overwrite):
            raise OutputError(f"`out` {out} already holds {len(parquet)} trace file(s)",
                              hint="pass `resume` to continue that scan or `overwrite` to start over")

    def earlier_sizes(self, fingerprint: dict[str, Any]) -> list[int]:
        """Under resume: refuse a scan made with other options; return the batch sizes it covers."""
        manifest = self._manifest()
        if manifest is None:
            if self.path.is_dir() and trace_files(self.path):
                raise OutputError(f"{self.path}: trace files without {MANIFEST}; cannot check they belong to this "
                                  "scan", hint="use `overwrite` or another `out`")
            return []
        old = manifest.get("fingerprint", {})
        changed = [k for k in sorted(set(fingerprint) | set(old)) if old.get(k) != fingerprint.get(k)]
        if changed:
            what = "; ".join(f"{k} was {old.get(k)!r}, now {fingerprint.get(k)!r}" for k in changed)
            raise OutputError(f"`resume`: {self.path} was scanned with different {', '.join(changed)} ({what})",
                              hint="resume with the same options, or use `overwrite` / another `out`")
        return sorted(int(b) for b in manifest.get("batch_sizes") or [])

    def _manifest(self) -> dict[str, Any] | None:
        path = self.path / MANIFEST
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise OutputError(f"{path}: unreadable ({exc.__class__.__name__})",
                              hint="start over with `overwrite` or use another `out`") from exc

    # ------------------------------------------------------------------ once the inputs are good

    def begin(self, fingerprint: dict[str, Any], sizes: list[int], provenance: dict[str, Any], overwrite: bool,
              log: Callable[[str], None]) -> None:
        """Create the directory, drop temporary files an interrupted write left, under overwrite remove
        what an earlier scan wrote (nothing else), and write the manifest."""
        make_dir(self.path, "`out`")
        stale = stale_temp_files(self.path)
        for f in stale:
            f.unlink()
        if stale:
            log(f"removed {len(stale)} temporary file(s) an interrupted write left in {self.path}")
        if overwrite:
            for f in trace_files(self.path):
                if f.name.startswith("trace-") and is_mgaudit_trace(f):
                    f.unlink()
            for name in (MANIFEST, SUMMARY, *CARD_FILES):
                if (self.path / name).exists():
                    (self.path / name).unlink()
        atomic_write_json(self.path / MANIFEST, {"fingerprint": fingerprint, "batch_sizes": sizes,
                                                 "provenance": provenance})

    def write(self, unit: Unit, rows: list[dict[str, Any]], provenance: dict[str, Any]) -> None:
        with trace_writer(unit.path, provenance) as w:
            w.write(rows)

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.path / SUMMARY, summary)

    # ------------------------------------------------------------------ reading back

    def reference_runs(self) -> dict[int, Steps]:
        """The reference runs the scan's ``trace-solo-*`` files hold, by prompt index."""
        import pyarrow.parquet as pq

        runs: dict[int, Steps] = {}
        for f in sorted(self.path.glob("trace-solo-*.parquet")):
            t = pq.read_table(f, columns=["prompt_index", "step", "solo_token", "solo_top1_logit", "solo_top2_logit",
                                          "solo_runner_up", "prompt_len", "solo_margin_kind",
                                          "solo_alternatives"]).to_pydict()
            kinds, alts = t["solo_margin_kind"], t["solo_alternatives"]
            order = sorted(range(len(t["step"])), key=lambda k: (t["prompt_index"][k], t["step"][k]))
            for k in order:  # (the prompt's length as recorded: what a server counted where no ids were sent)
                s = runs.setdefault(int(t["prompt_index"][k]), Steps(meta={"from_traces": f.name,
                                                                           "prompt_tokens": t["prompt_len"][k]}))
                s.tokens.append(int(t["solo_token"][k]))
                s.top1.append(float(t["solo_top1_logit"][k]))
                s.top2.append(float(t["solo_top2_logit"][k]))
                s.runner_up.append(int(t["solo_runner_up"][k]))
                if kinds[k] is not None:  # a sampled run
                    s.kind = (s.kind or []) + [kinds[k]]
                if alts[k] is not None:  # the best tokens its backend listed
                    s.alternatives = (s.alternatives or []) + [[(int(a["token"]), float(a["logit"])) for a in alts[k]]]
        return runs

    def units(self) -> list[dict[str, Any]]:
        """The ``unit`` block of every trace file's provenance (what ran, its requests and timings)."""
        out = []
        for f in trace_files(self.path):
            unit = read_provenance(f).get("unit")
            if unit:
                out.append(unit)
        return out
