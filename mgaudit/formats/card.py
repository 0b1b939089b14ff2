"""A server's determinism card (``scan --sweep``): its fields, written (``_card.json``, ``_card.md``
for a pull-request comment, ``_card.png``) and read back with checks in this module only. The files
sit beside the traces; their leading ``_`` keeps Parquet readers of the folder (``pandas.read_parquet(DIR)``)
from taking them for data, as with ``_scan.json`` and ``_summary.json``.

* ``engine``: what answered: name and version from its info routes, sequences decoded together
  and the prefix cache where it says, the model it serves, the ``engine_note``;
* ``sweep``: what ran: prompts, new tokens, rounds, levels (and those the bisection added), axes;
* ``series``: per axis and setting (``concurrency``: together, staggered; ``repetition``;
  ``cache``: cold, warm; ``depth``; ``route``) one row per level: sequences identical to the
  same prompt alone with a 95 % interval and the spread across rounds, the teacher-forced per-step
  flip rate with its interval, where sequences parted (token positions), margins and severities
  at flips, throughput, retried requests, cached prompt tokens; the concurrency series with their
  onset (:func:`mgaudit.audit.outcomes.onset`);
* ``onsets``, ``position``: the onset of each concurrency series, the earliest divergence by token;
* ``expectation``: what ``verify --card`` checks in CI;
* ``not_run``: axes left out, and why; ``notes``: what else a reader must know (a warm cache that
  found nothing cached); ``requests``: sent, retried, the plan's bound;
* ``provenance``: the scan's provenance (prompts, configuration, versions, time).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..errors import InputError
from .document import Document

CARD_FORMAT = "mgaudit.card"
CARD_VERSION = 1
FILES = ("_card.json", "_card.md", "_card.png")


@dataclass(frozen=True)
class Card(Document):
    """A determinism card (see the module doc); also a read-only mapping of its fields."""

    engine: dict[str, Any]
    sweep: dict[str, Any]
    series: list[dict[str, Any]]
    onsets: dict[str, Any]
    position: dict[str, Any] | None = None
    expectation: dict[str, Any] | None = None
    not_run: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    requests: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    format: str = CARD_FORMAT
    version: int = CARD_VERSION

    WHAT: ClassVar[str] = "determinism card"

    def write(self, folder: Path) -> list[Path]:
        """``_card.json``, ``_card.md`` and ``_card.png`` in ``folder``, each written atomically."""
        from ..plots import plot_card
        from .files import atomic_write_bytes

        folder = Path(folder)
        paths = [folder / name for name in FILES]
        self.write_json(paths[0])
        atomic_write_bytes(paths[1], markdown(self).encode())
        plot_card(self, paths[2])
        return paths

    def headline(self) -> str:
        """The engine in one line (:func:`engine_line`)."""
        return engine_line(self.engine)

    @classmethod
    def read(cls, path: Path) -> "Card":
        """A card from its JSON (or the folder a sweep wrote it to)."""
        path = Path(path)
        return super().read(path / FILES[0] if path.is_dir() else path)


# --------------------------------------------------------------------------- Markdown


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.3g} %"


def _ci(p: dict[str, Any] | None) -> str:
    if not p or not p.get("n"):
        return "-"
    lo, hi = p["ci95"]
    return f"{100 * p['rate']:.3g} % ({100 * lo:.3g}-{100 * hi:.3g})"


def _num(x: Any, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def engine_line(engine: dict[str, Any]) -> str:
    """The engine in one line: name, version or build, slots, prefix cache."""
    parts = [str(engine.get("engine") or "unknown engine")]
    if engine.get("version") or engine.get("build"):
        parts.append(str(engine.get("version") or engine.get("build")))
    if engine.get("slots"):
        parts.append(f"{engine['slots']} sequences at a time")
    cache = engine.get("prefix_cache")
    if cache:
        block = f", {cache['block_size']}-token blocks" if cache.get("block_size") else ""
        parts.append(f"prefix cache {'on' if cache.get('enabled') else 'off'}{block}")
    return ", ".join(parts)


def row_cells(r: dict[str, Any]) -> dict[str, str]:
    """One level of a series as table cells by column (Markdown and the terminal share them)."""
    ident = r["identical"]
    first = r.get("first_divergence") or {}
    m = r.get("margins_at_flips") or {}
    cand, ref = (m.get("candidate") or {}).get("median"), (m.get("reference") or {}).get("median")
    tput = r.get("throughput") or {}
    return {
        "in flight": str(r["level"]),
        "identical to alone": f"{ident['k']}/{ident['n']}",
        "95 % CI": _ci(ident),
        "per round": " ".join(f"{p['identical']}/{p['sequences']}" for p in r["per_round"]),
        "per-step flip rate (95 % CI)": _ci(r["flips"]),
        "first divergence (min / median token)":
            f"{_num(first.get('min'), 'g')} / {_num(first.get('median'), 'g')}" if first else "-",
        "margin at flips (candidate / alone, median)": f"{_num(cand)} / {_num(ref)}",
        "severity": ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in (r.get("severity") or {}).items()) or "-",
        "tokens/s": _num(tput.get("tokens_per_second"), ".1f"),
        "retried": str(r.get("retried_requests", 0)),
        "cached prompt tokens": _num(r.get("cached_prompt_tokens"), "g"),
    }


COLUMNS = ("in flight", "identical to alone", "95 % CI", "per round", "per-step flip rate (95 % CI)",
           "first divergence (min / median token)", "margin at flips (candidate / alone, median)", "severity",
           "tokens/s", "retried", "cached prompt tokens")


def markdown(card: Card) -> str:
    e, sw = card.engine, card.sweep
    prov = card.provenance or {}
    prompts = (prov.get("prompts") or {}).get("name", "?")
    lines = [f"## Determinism card: {engine_line(e)}", "",
             f"Model `{e.get('model')}`" + (f" ({e['model_path']})" if e.get("model_path") not in (None, e.get("model"))
                                            else "")
             + f" at {e.get('url')}" + (f"; engine note: {e['engine_note']}" if e.get("engine_note") else "") + ".",
             f"Sweep: {sw['prompts']} prompts ({prompts}), {sw['max_new_tokens']} new tokens, {sw['rounds']} "
             f"round(s), up to {sw['top']} in flight (levels {', '.join(map(str, sw['levels']))}"
             + (f"; bisected: {', '.join(map(str, sw['refined']))}" if sw.get("refined") else "")
             + f"); route: {sw.get('route')}. Measured from: {(prov.get('machine') or '?')}, {prov.get('created', '')}.",
             "", "**Onsets**", ""]
    for name, o in card.onsets.items():
        lines.append(f"- requests {'sent together' if name == 'together' else name}: {o['statement']}"
                     + ("" if o.get("level") is None or o.get("exact") else " (not bisected to adjacent levels)"))
    if card.position:
        lines.append(f"- by token position: {card.position['statement']}")
    else:
        lines.append("- by token position: no sequence parted from its run alone")
    if card.expectation:
        lines.append(f"- expectation (`mgaudit verify PROMPTS --endpoint URL --card _card.json`): "
                     f"{card.expectation['statement']}")
    for axis in dict.fromkeys(s["axis"] for s in card.series):
        lines += ["", f"**{axis}**", "", "| setting | " + " | ".join(COLUMNS) + " |",
                  "|---|" + "---:|" * len(COLUMNS)]
        for s in (s for s in card.series if s["axis"] == axis):
            lines += [f"| {s['name']} | " + " | ".join(row_cells(r).values()) + " |" for r in s["rows"]]
    if card.not_run:
        lines += ["", "Not run: " + "; ".join(f"{x['axis']} ({x['reason']})" for x in card.not_run) + "."]
    lines += [f"\nNote: {n}." for n in card.notes]
    q = card.requests
    lines += ["", f"Requests: {q.get('candidate')} audited, {q.get('reference')} reference runs (the plan's bound: "
                  f"{q.get('bound')}), {q.get('retried')} retried after a transient failure. Identical = the same "
                  "tokens as the same request sent alone; a row pools every round.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- what verify checks


#: Engine fields a card's expectation depends on: (name, key of the engine block).
ENGINE_FIELDS = (("engine", "engine"), ("version", "version"), ("build", "build"), ("sequences at a time", "slots"),
                 ("model", "model"))


def expected_level(card: Card, path: Path) -> int:
    """The level of requests sent together up to which the card found every sequence identical."""
    exp = card.expectation or {}
    if not exp.get("identical_up_to"):
        raise InputError(f"{path}: the card expects no level to be identical"
                         + (f" ({exp['statement']})" if exp.get("statement") else " (no concurrency series)"),
                         hint="sweep again with the concurrency axis, or check the server with `batch_size`")
    return int(exp["identical_up_to"])


def engine_differences(card: Card, engine: dict[str, Any]) -> dict[str, list[Any]]:
    """``{field: [card's value, this server's]}`` where the server answering now is not the one the card
    was measured on (fields either side does not tell are not compared)."""
    out = {}
    for name, key in ENGINE_FIELDS:
        a, b = card.engine.get(key), engine.get(key)
        if a is not None and b is not None and a != b:
            out[name] = [a, b]
    a, b = (card.engine.get("prefix_cache") or {}).get("enabled"), (engine.get("prefix_cache") or {}).get("enabled")
    if a is not None and b is not None and a != b:
        out["prefix cache"] = ["on" if a else "off", "on" if b else "off"]
    return out
