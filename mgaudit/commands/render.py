"""The one renderer of scan summaries and verify reports, whatever backend produced them
(tables on stdout; ``--json`` prints the objects themselves)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from . import console


def _num(x: Any, spec: str = ".4g") -> str:
    return "-" if x is None else format(x, spec)


def _severity_cell(counts: dict[str, int] | None) -> str:
    if not counts:
        return "-"
    return ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items() if v)


def _io_line(io: dict[str, Any] | None) -> str | None:
    """The server's answers in words: logprob precision and where token ids came from."""
    if not io:
        return None
    prec = (io.get("logprob_precision") or {}).get("reading")
    ids = io.get("token_ids")
    if isinstance(ids, dict):
        ids = ids.get("method", "mapped") + (f" ({ids['unmapped_strings']} strings unmapped)"
                                             if ids.get("unmapped_strings") else "")
    parts = [f"logprobs: {prec}" if prec else None, f"token ids: {ids}" if ids else None,
             f"retries: {io['retries']}" if io.get("retries") else None]
    return "; ".join(p for p in parts if p) or None


def scan_summary(summary: dict[str, Any], out: Path) -> None:
    prov = summary["provenance"]
    ref = summary.get("reference") or {}
    title = f"scan: {prov['prompts']['name']} on {prov['model']['name']}"
    if ref.get("cross"):
        title += f" against {ref['label']}"
    table = Table(title=title)
    for col in ("condition", "batch size", "sync steps", "flips", "flip rate", "max batched margin at flip",
                "sequences diverged (free)", "median first divergence", "severity"):
        table.add_column(col, justify="right")
    for e in summary["by_condition"]:
        s, f = e.get("sync", {}), e.get("free", {})
        sev = (s or {}).get("severity") or (f or {}).get("severity")
        table.add_row(e["condition"], str(e["batch_size"]), str(s.get("steps", "-")), str(s.get("flips", "-")),
                      f"{100 * s['flip_rate']:.2f}%" if s else "-", _num(s.get("max_batched_margin_at_flip")),
                      f"{f['sequences_diverged']}/{f['sequences']}" if f else "-",
                      _num(f.get("first_divergence_median"), "g"), _severity_cell(sev))
    console.out.print(table)
    runs = [r for r in summary.get("runs") or [] if r.get("kind") == "candidate"]
    if runs and any(r.get("finish_reasons") for r in runs):
        t = Table(title="candidate runs")
        for col in ("condition", "B", "sequences", "tokens/s", "retried", "cached prompt tokens (median)"):
            t.add_column(col, justify="right")
        for r in runs:
            t.add_row(r["condition"], str(r["batch_size"]), str(r["sequences"]), _num(r.get("tokens_per_second"), ".1f"),
                      str(r["retried"]), _num(r.get("cached_tokens_median"), "g"))
        console.out.print(t)
    solo = summary["solo"]
    console.out.print(f"reference: {solo['sequences']} sequences, {solo['steps']} steps, {solo['ties']} exact ties "
                      f"(margin 0){', by ' + escape(ref['label']) if ref.get('cross') else ''}. Traces: {out}")
    scoring = summary.get("scoring") or {}
    if scoring.get("route") != "teacher forcing" and (scoring.get("requests") or scoring.get("unscored_sequences")):
        console.out.print(_scoring_line(scoring))
    line = _io_line(summary.get("endpoint"))
    if line:
        console.out.print(escape(line))


#: The card's columns shown on a terminal (_card.md has them all).
CARD_COLUMNS = ("in flight", "identical to alone", "95 % CI", "per round", "per-step flip rate (95 % CI)", "tokens/s")


def card_summary(card, out: Path) -> None:
    """A sweep's card: one table per axis, the onsets, what was not run, where the files are."""
    from ..formats.card import FILES, engine_line, row_cells
    from .boundary import as_flags

    console.out.print(f"determinism card: {escape(engine_line(card.engine))}, {escape(str(card.engine.get('model')))}")
    for axis in dict.fromkeys(s["axis"] for s in card.series):
        t = Table(title=axis)
        t.add_column("setting")
        for col in CARD_COLUMNS:
            t.add_column(col, justify="right")
        for s in (s for s in card.series if s["axis"] == axis):
            for r in s["rows"]:
                cells = row_cells(r)
                t.add_row(escape(s["name"]), *(cells[c] for c in CARD_COLUMNS))
        console.out.print(t)
    for name, o in card.onsets.items():
        console.out.print(f"onset ({name}): {escape(o['statement'])}")
    if card.position:
        console.out.print(f"by token position: {escape(card.position['statement'])}")
    if card.expectation:
        console.out.print(f"expectation (verify --card): {escape(card.expectation['statement'])}")
    for x in card.not_run:
        console.out.print(f"not run: {x['axis']} ({escape(as_flags(x['reason']))})")
    for n in card.notes:
        console.out.print(f"note: {escape(n)}")
    q = card.requests
    console.out.print(f"requests: {q['candidate']} audited, {q['reference']} reference runs, {q['retried']} retried. "
                      f"Card: {', '.join(str(out / f) for f in FILES)}")


def _scoring_line(scoring: dict[str, Any]) -> str:
    if scoring.get("route") in (None, "none"):
        return f"teacher-forced past a divergence: not scored ({scoring.get('reason', 'no route')})"
    rps = scoring.get("requests_per_sequence")
    return (f"teacher-forced past a divergence: {scoring['route']} route, {scoring['requests']} request(s)"
            + (f", {rps:.2f} per diverged sequence" if rps is not None else ""))


def verify_report(report: dict[str, Any]) -> None:
    s, cand = report["summary"], report["candidate"]
    what = cand["label"] + ", " + cand["describe"]
    if cand.get("policy"):
        pol = cand["policy"]
        what = f"policy {pol['name']}" + (f" (tau={cand['threshold']!r}, {pol['fast_path']} fast path)"
                                          if pol["name"] == "gate" else "") + f", batch size {cand['batch_size']}"
        what += f", contract {pol['contract']}"
    ref_name = _reference_name(report)
    table = Table(title=f"verify: {escape(what)}")
    table.add_column(f"sequences identical to {ref_name}", justify="right")
    cols = [f"{s['identical']}/{s['sequences']}"]
    if "trigger_rate" in s:
        table.add_column("trigger rate", justify="right")
        table.add_column("mismatches repaired", justify="right")
        cols += [f"{100 * s['trigger_rate']:.1f}%", str(s["repairs"])]
    for col, key, spec in (("reference s", "reference_seconds", ".1f"), ("candidate s", "candidate_seconds", ".1f"),
                           ("candidate tok/s", "candidate_tokens_per_second", ".1f")):
        table.add_column(col, justify="right")
        cols.append(_num(s.get(key), spec))
    if s.get("speedup_vs_reference"):
        table.add_column("speed-up vs reference", justify="right")
        cols.append(f"{s['speedup_vs_reference']:.2f}x")
    table.add_row(*cols)
    console.out.print(table)
    if s.get("plan"):
        console.out.print("fast path plan: " + escape(", ".join(f"{k}: {v}" for k, v in s["plan"].items())))
    _drift(report.get("drift") or [])
    if s.get("exactness"):
        console.out.print("checked: " + escape(s["exactness"]))
    _differences(report, ref_name)
    _sampling(s)
    line = _io_line(s.get("endpoint"))
    if line:
        console.out.print(escape(line))
    if s.get("prompt_tokens_differ"):
        console.out.print(f"warning: the two sides counted other prompt tokens for {len(s['prompt_tokens_differ'])} "
                          "prompt(s) (each server tokenized the text itself): those comparisons do not start from "
                          "the same token ids")
    console.out.print(verdict_line(report))


def _sampling(s: dict[str, Any]) -> None:
    """Seeded sampling: the settings, and for a server whether it honours seeds."""
    if not s.get("sampling"):
        return
    from ..decoding.sampling import Sampling

    console.out.print("sampled: " + escape(Sampling(**s["sampling"]).describe()) +
                      "; each prompt draws from its own stream (its draw seed is in the report)")
    seeds = s.get("seeds")
    if seeds:
        n = seeds["prompts"]
        console.out.print(f"seeds: the same request alone again gave the same tokens for {seeds['repeatable']}/{n} "
                          f"prompts; another seed gave other tokens for {seeds['seed_changes_output']}/{n}: "
                          + ("the server honours seeds" if seeds["honours_seeds"] else "the server does NOT honour "
                             "seeds") + ". Its draws are not in its answers: no sampling margins (differences are "
                          "of unknown severity), no teacher-forced flips past a divergence.")


def _reference_name(report: dict[str, Any]) -> str:
    ref = report["reference"]
    if ref.get("cross"):
        return f"{ref['label']} alone"
    return "solo" if ref.get("contract", "solo") == "solo" else "the batch-invariant reference"


def _drift(drift: list[dict[str, Any]]) -> None:
    if not drift:
        return
    t = Table(title="drift events (fast path != batch-1 recomputation, bit for bit)")
    for col in ("prompt", "step", "what differed", "replayed from step", "op found", "rows it ran", "op now runs"):
        t.add_column(col)
    for e in drift:
        t.add_row(escape(e["prompt_id"]), str(e["step"]), e["what"], str(e["replayed_from"]),
                  escape(e["op"] or "not attributed"), str(e["rows"] or "-"), escape(e["lowered_to"] or "-"))
    console.out.print(t)


def _differences(report: dict[str, Any], ref_name: str) -> None:
    s = report["summary"]
    bad = [r for r in report["sequences"] if not r["identical"]]
    if not bad:
        return
    t = Table(title=f"sequences that differ from {ref_name} (free-running)")
    for col in ("prompt", "first divergent step", "reference token", "candidate token", "reference margin",
                "candidate margin", "severity"):
        t.add_column(col)
    for r in bad:
        d = r["divergence"]
        t.add_row(escape(r["prompt_id"]), str(r["first_divergence"]),
                  escape(repr(d["reference_text"])) if d.get("reference_text") is not None else str(d["reference_token"]),
                  escape(repr(d["candidate_text"])) if d.get("candidate_text") is not None else str(d["candidate_token"]),
                  _num(d.get("reference_margin")), _num(d.get("candidate_margin")), d.get("severity") or "-")
    console.out.print(t)
    tf = s.get("teacher_forced")
    if tf:
        scope = "" if tf.get("available") else " (up to each first divergence only)"
        line = f"teacher-forced{scope}: {tf['flips']} flip(s) in {tf['steps']} steps ({100 * tf['flip_rate']:.2f}%)"
        console.out.print(line + ("; " + _scoring_line(tf) if tf.get("route") != "teacher forcing" else ""))
    sev = s["severity"]
    if sev.get("tau") is not None:
        c = sev["counts"]
        src = sev.get("tau_source") or {}
        where = src.get("path") or "given"
        console.out.print(f"severity (tau {sev['tau']:.6g} from {escape(str(where))}): {c['within_noise']} within noise, "
                          f"{c['anomalous']} anomalous" + (f", {c['unknown']} unknown" if c.get("unknown") else ""))
        hist = [h for h in sev["reference_gap_histogram"] if h["count"]]
        if hist:
            console.out.print("how far below its own token the reference put the candidate's: " + ", ".join(
                f"[{h['from']:g}, {'inf' if h['to'] is None else format(h['to'], 'g')}): {h['count']}" for h in hist))
        worst = [w for w in sev["worst"] if w.get("severity") == "anomalous"][:5]
        for w in worst:
            console.out.print(f"  anomalous: {escape(w['prompt_id'])} step {w['step']}: reference "
                              f"{escape(repr(w.get('reference_text')))} vs {escape(repr(w.get('candidate_text')))} "
                              f"({escape(w.get('reason') or '')})")


def verdict_line(report: dict[str, Any]) -> str:
    card = (report["candidate"] or {}).get("card")
    line = _verdict(report)
    return line if card is None else f"{line} (the card {escape(card['path'])} expects: {escape(card['expects'])})"


def _verdict(report: dict[str, Any]) -> str:
    s = report["summary"]
    ref = _reference_name(report)
    if s["all_identical"]:
        return f"[bold green]PASS[/]: all {s['sequences']} sequences identical to {ref}"
    n = s["sequences"] - s["identical"]
    counts = s["severity"]["counts"]
    if counts.get("anomalous"):
        return f"[bold red]FAIL[/]: {n} of {s['sequences']} sequences differ from {ref}; {counts['anomalous']} " \
               "difference(s) anomalous (rounding cannot explain them)"
    if s["severity"].get("tau") is not None:
        return f"[bold yellow]DIFFER[/]: {n} of {s['sequences']} sequences differ from {ref}, every difference " \
               "within noise"
    return f"[bold red]FAIL[/]: {n} of {s['sequences']} sequences differ from {ref}"
