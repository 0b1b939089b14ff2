"""llama.cpp's batch variance: flips and diverged sequences at 2, 4, 8 and 16 slots.

For each slot count S it starts the cached ``llama-server`` (``-np S``, 1024 context tokens
per slot) with the default model's GGUF and runs ``scan --endpoint`` on each sample set at
batch size S (S requests in flight). Writes ``endpoint_flips.json`` and ``endpoint_flips.md``
to ``--out`` and keeps the traces under ``--out/traces/``.

    python benchmarks/endpoint_flips.py --out bench-endpoint --limit 16 --max-new-tokens 48
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def fmt(x, spec=".4g"):
    return "-" if x is None else format(x, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--slots", default="2,4,8,16")
    ap.add_argument("--sets", default="math,code,chat")
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    from mgaudit.scan import ScanConfig, scan
    from mgaudit.endpoint.llama_server import LlamaServer, build_llama_server
    from mgaudit.models import default_gguf
    from mgaudit.machine import describe

    build = build_llama_server(log=print)
    gguf = default_gguf()
    results = []
    t_all = time.perf_counter()
    for s in [int(x) for x in args.slots.split(",")]:
        srv = LlamaServer(build.binary, gguf, slots=s, ctx=1024 * s, threads=args.threads,
                          log_path=args.out / f"server-np{s}.log")
        args.out.mkdir(parents=True, exist_ok=True)
        with srv:
            for name in args.sets.split(","):
                t0 = time.perf_counter()
                res = scan(ScanConfig(
                    prompts=name, out=args.out / "traces" / f"{name}-np{s}", endpoint=srv.url, batch_sizes=[s],
                    max_new_tokens=args.max_new_tokens, limit=args.limit, overwrite=True,
                    engine_note=f"llama-server -np {s} -c {1024 * s} -t {srv.threads}"))
                e = res.summary["by_condition"][0]
                sync, free = e["sync"], e["free"]
                row = {"set": name, "slots": s, "batch_size": s, "steps": sync["steps"], "flips": sync["flips"],
                       "flip_rate": sync["flip_rate"], "sequences": free["sequences"],
                       "diverged": free["sequences_diverged"],
                       "first_divergence_median": free["first_divergence_median"],
                       "batched_margin_at_flips": sync["batched_margin_at_flips"],
                       "solo_margin_at_flips": sync["solo_margin_at_flips"],
                       "seconds": time.perf_counter() - t0}
                results.append(row)
                print(json.dumps(row), flush=True)
    meta = {"cpu": describe(), "build": build.key, "threads": srv.threads, "limit": args.limit,
            "max_new_tokens": args.max_new_tokens, "seconds": time.perf_counter() - t_all}
    (args.out / "endpoint_flips.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    lines = ["| set | slots (= requests in flight) | compared steps | flips | per-step flip rate | sequences diverged "
             "| median first divergence | batched margin at flips (median / max) | solo margin at flips (median / max) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        bm, sm = r["batched_margin_at_flips"] or {}, r["solo_margin_at_flips"] or {}
        lines.append(f"| {r['set']} | {r['slots']} | {r['steps']} | {r['flips']} | {100 * r['flip_rate']:.2f}% | "
                     f"{r['diverged']}/{r['sequences']} | {fmt(r['first_divergence_median'], 'g')} | "
                     f"{fmt(bm.get('q50'))} / {fmt(bm.get('max'))} | {fmt(sm.get('q50'))} / {fmt(sm.get('max'))} |")
    (args.out / "endpoint_flips.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
