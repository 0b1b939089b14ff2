"""Determinism cards of real engines, side by side: llama-server at several slot counts and vLLM's CPU build.

Each server gets one ``scan --sweep`` (the library call behind it): requests in flight together and
staggered up to a level (bisected to the onset), cold against warm prompt cache, long prompts, the
server's chat template against token ids, each level for ``--rounds`` rounds. llama-server is started
(the cached build, the default GGUF, ``-np S``, ``--ctx-per-slot`` tokens a slot) once per slot count
S; slot counts not in ``--all-axes-slots`` get the concurrency axes only. vLLM is started with
``--max-num-seqs`` and prefix caching on, and swept up to ``--vllm-concurrency`` in flight. Each card
lands in ``--out/<engine>-<setting>/`` (``_card.json``, ``_card.md``, ``_card.png`` beside the
traces); ``engine_cards.json`` and ``engine_cards.md`` in ``--out`` hold the onsets of all of them
with their 95 % intervals and the machine.

    python benchmarks/engine_cards.py --out bench-cards                 # the full sweeps (about an hour on 2 cores)
    python benchmarks/engine_cards.py --out bench-cards --engines llama --llama-slots 8 --limit 4 --max-new-tokens 16
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _share(series: list[dict], axis: str, name: str, level: int | None = None) -> str:
    """k/n identical at a series' level (its last row where no level is given)."""
    s = next((s for s in series if s["axis"] == axis and s["name"] == name), None)
    if s is None:
        return "not run"
    rows = [r for r in s["rows"] if level is None or r["level"] == level] or s["rows"][-1:]
    r = rows[-1]
    lo, hi = r["identical"]["ci95"]
    return f"{r['identical']['k']}/{r['identical']['n']} ({100 * lo:.0f}-{100 * hi:.0f} %)"


def _onset(o: dict | None) -> str:
    if not o:
        return "not run"
    if o.get("level") is None:
        return f"none up to {o['identical_up_to']} (differing < {100 * o['at_top']['differing_upper95']:.0f} %)"
    d = o["differing"]
    below = o.get("below")
    text = f"{o['level']}: {d['k']}/{d['n']} differ ({100 * d['ci95'][0]:.0f}-{100 * d['ci95'][1]:.0f} %)"
    if below:
        text += f"; {below['level']}: 0/{below['sequences']} (< {100 * below['differing_upper95']:.0f} %)"
    return text


class Ports:
    """The port of each server of a run, kept in a file so that ``--resume`` starts them on the same ones."""

    def __init__(self, path: Path):
        self.path = path
        self.ports = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, name: str) -> int:
        from mgaudit.endpoint.process import free_port

        if name not in self.ports:
            self.ports[name] = free_port()
            self.path.write_text(json.dumps(self.ports, indent=2) + "\n")
        return self.ports[name]


def row_of(label: str, flags: str, card, seconds: float) -> dict:
    top = card.sweep["top"]
    pos = card.position
    return {"server": label, "flags": flags, "top": top, "seconds": round(seconds, 1),
            "together": _onset(card.onsets.get("together")), "staggered": _onset(card.onsets.get("staggered")),
            "alone, run to run": _share(card.series, "repetition", "alone, run to run"),
            "warm cache": _share(card.series, "cache", "warm"),
            "warm cache, long prompts": _share(card.series, "cache", "warm, long prompts"),
            "long prompts, top level": _share(card.series, "depth", "long prompts", top),
            "chat template, top level": _share(card.series, "route", "chat template (server)", top),
            "earliest divergence (token)": "-" if pos is None else f"{pos['step']} ({pos['series']}, {pos['level']})",
            "expectation": (card.expectation or {}).get("statement")}


def sweep(url: str, out: Path, args, note: str, axes: list[str], top: int | None):
    from mgaudit.audit.sweep import SweepSpec
    from mgaudit.scan import ScanConfig, scan

    spec = SweepSpec(rounds=args.rounds, max_concurrency=top, axes=axes, long_prompt_tokens=args.long_prompt_tokens)
    config = ScanConfig(prompts=args.prompts, out=out, limit=args.limit, max_new_tokens=args.max_new_tokens,
                        endpoint=url, tokenizer="smollm2", engine_note=note, sweep=spec, overwrite=not args.resume,
                        resume=args.resume)
    t0 = time.perf_counter()
    result = scan(config, log=lambda m: print(m, flush=True))
    return result.card, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--engines", default="llama,vllm")
    ap.add_argument("--llama-slots", default="1,2,4,8")
    ap.add_argument("--all-axes-slots", default="8", help="slot counts swept on every axis (the others: concurrency)")
    ap.add_argument("--axes", default=None, help="the axes of every sweep (instead of the two defaults above)")
    ap.add_argument("--llama-concurrency", type=int, default=8, help="highest level for every llama-server")
    ap.add_argument("--ctx-per-slot", type=int, default=2048)
    ap.add_argument("--vllm-seqs", type=int, default=16)
    ap.add_argument("--vllm-concurrency", type=int, default=32)
    ap.add_argument("--prompts", default="math")
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--long-prompt-tokens", type=int, default=1024)
    ap.add_argument("--resume", action="store_true", help="continue the sweeps in --out instead of starting over")
    args = ap.parse_args()

    from mgaudit.audit.sweep import AXES
    from mgaudit.machine import describe

    args.out.mkdir(parents=True, exist_ok=True)
    rows, t_all = [], time.perf_counter()
    ports = Ports(args.out / "ports.json")  # a resumed sweep must reach its server at the same URL
    engines = args.engines.split(",")
    if "llama" in engines:
        from mgaudit.endpoint.llama_server import LlamaServer, build_llama_server
        from mgaudit.models import default_gguf

        binary, full = build_llama_server(log=print).binary, {int(s) for s in args.all_axes_slots.split(",") if s}
        for s in (int(x) for x in args.llama_slots.split(",")):
            with LlamaServer(binary, default_gguf(), slots=s, ctx=args.ctx_per_slot * s,
                             port=ports.get(f"llama-np{s}"), log_path=args.out / f"llama-np{s}.log") as srv:
                axes = args.axes.split(",") if args.axes else list(AXES) if s in full else ["concurrency", "staggered"]
                card, secs = sweep(srv.url, args.out / f"llama-np{s}", args, srv.describe(), axes,
                                   args.llama_concurrency)
            rows.append(row_of(f"llama-server, {s} slot{'s' if s > 1 else ''}", srv.describe(), card, secs))
            print(json.dumps(rows[-1]), flush=True)
    if "vllm" in engines:
        from mgaudit.endpoint.vllm_server import VllmServer, ensure_vllm
        from mgaudit.models import fetch_default_model

        with VllmServer(ensure_vllm(log=print), fetch_default_model("bfloat16"), max_num_seqs=args.vllm_seqs,
                        port=ports.get("vllm"), log_path=args.out / "vllm.log") as srv:
            axes = args.axes.split(",") if args.axes else list(AXES)
            card, secs = sweep(srv.url, args.out / f"vllm-seqs{args.vllm_seqs}", args, srv.describe(), axes,
                               args.vllm_concurrency)
        rows.append(row_of(f"vLLM CPU, --max-num-seqs {args.vllm_seqs}", srv.describe(), card, secs))
        print(json.dumps(rows[-1]), flush=True)
    meta = {"machine": describe(), "prompts": args.prompts, "limit": args.limit, "max_new_tokens": args.max_new_tokens,
            "rounds": args.rounds, "long_prompt_tokens": args.long_prompt_tokens,
            "seconds": round(time.perf_counter() - t_all, 1)}
    (args.out / "engine_cards.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    cols = [k for k in rows[0] if k not in ("flags",)] if rows else []
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    lines += ["", f"{meta['machine']}; {args.prompts}, {args.limit} prompts, {args.max_new_tokens} new tokens, "
                  f"{args.rounds} rounds, long prompts of {args.long_prompt_tokens} tokens; {meta['seconds']:.0f} s"]
    (args.out / "engine_cards.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
