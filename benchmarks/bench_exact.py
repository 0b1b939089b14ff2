"""The price of exactness on this machine, measured side by side in one process.

For each prompt set and batch size, every configuration decodes the same prompts and
is compared token by token with its contract's reference decoded in the same run:

* ``solo``: stock batch-1 decoding (what ``generate`` gives alone): the reference of
  the ``solo`` contract, and the time exactness is meant to beat;
* ``solo-bi``: batch-1 decoding through the batch-invariant kernels (every decode GEMM
  at a fixed row count): the reference of the ``batch-invariant`` contract;
* ``none``: generate-style padded batching (fast, not exact);
* ``invariant``: the ragged fast path with the probe's per-op plan (contract solo);
* ``gate``: that fast path plus margin checks and audits (contract solo);
* ``invariant-bi``: the ragged path with fixed-row-count GEMMs (contract batch-invariant).

Reported: sequences identical to the reference, and wall-time ratios against ``none``
and ``solo`` from the same round (median over ``--rounds``, configurations interleaved).
The probe runs once before timing (its time is reported, and it is cached per machine).

    python benchmarks/bench_exact.py --sets chat --batch-sizes 16 --limit 16 --max-new-tokens 48
    python benchmarks/bench_exact.py --sets math,code,chat,PATH.jsonl --batch-sizes 4,8,16,32 --no-timing
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, median  # noqa: E402

CONFIGS = ["solo", "solo-bi", "none", "invariant", "gate", "invariant-bi"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="chat")
    ap.add_argument("--batch-sizes", default="16")
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--threshold", type=float, default=0.25, help="gate tau (the demo's calibration gives ~0.25)")
    ap.add_argument("--audit-every", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=Path("bench-out/bench_exact.json"))
    args = ap.parse_args(argv)



    from mgaudit.decoding.policies import DecodePolicy, decode, reference_decode
    from mgaudit.decoding.invariance import probe
    from mgaudit.models import load_model
    from mgaudit.prompts import encode_prompt, load_prompts

    lm = load_model(args.model, device=args.device)
    env = environment()
    configs = [c for c in args.configs.split(",") if c]
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    rows = []
    t = time.perf_counter()
    rep = probe(lm.model, max(sizes))
    probe_s = time.perf_counter() - t
    print(f"# {env['cpu']}, torch {env['torch']}, {env['threads']} threads; "
          f"probe up to {rep.up_to} rows: {probe_s:.1f}s (cached: {rep.cached}); "
          f"plan-relevant limits: {rep.summary()['limited']}", file=sys.stderr)
    for set_name in args.sets.split(","):
        ps = load_prompts(set_name, limit=args.limit)
        ids = [encode_prompt(lm.tokenizer, p) for p in ps.prompts]
        eos, pad, T = lm.eos_token_ids, lm.pad_token_id, args.max_new_tokens
        kept_refs: dict = {}  # references do not depend on B: decoded (and timed) with the first B only
        for bi, B in enumerate(sizes):
            times = {c: [] for c in configs}
            same = {}
            extra = {}
            for _ in range(args.rounds):
                refs = dict(kept_refs) if bi else {}
                for c in configs:
                    t0 = time.perf_counter()
                    if c in ("solo", "solo-bi") and bi:
                        continue
                    if c in ("solo", "solo-bi"):
                        contract = "solo" if c == "solo" else "batch-invariant"
                        refs[contract] = [reference_decode(lm.model, p, T, eos, contract=contract).tokens
                                          for p in ids]
                        times[c].append(time.perf_counter() - t0)
                        continue
                    pol = {"none": DecodePolicy("none"), "invariant": DecodePolicy("invariant"),
                           "gate": DecodePolicy("gate", args.threshold, audit_every=args.audit_every),
                           "invariant-bi": DecodePolicy("invariant", contract="batch-invariant")}[c]
                    out = decode(lm.model, ids, pol, B, T, eos, pad, probe_report=rep)
                    times[c].append(out.seconds)
                    ref = refs.get(pol.contract)
                    if ref is None:
                        ref = refs[pol.contract] = [reference_decode(lm.model, p, T, eos, contract=pol.contract).tokens
                                                    for p in ids]
                    same[c] = sum(o.tokens == r for o, r in zip(out.sequences, ref))
                    extra[c] = {"plan": out.plan, "drift_events": len(out.drift_events), "lowered": out.lowered,
                                "triggers": sum(s.triggers for s in out.sequences),
                                "audits": sum(s.audits for s in out.sequences),
                                "steps": sum(len(s.tokens) for s in out.sequences)}
                kept_refs = refs
            med = {c: median(v) for c, v in times.items() if v}
            row = {"set": ps.name, "batch_size": B, "prompts": len(ids), "seconds": med, "identical": same,
                   "detail": extra}
            if "none" in med:
                row["vs_none"] = {c: med[c] / med["none"] for c in med}
            if "solo" in med:
                row["speedup_vs_solo"] = {c: med["solo"] / med[c] for c in med}
                solo_seconds = med["solo"]
            elif bi and "solo" in configs:
                row["speedup_vs_solo"] = {c: solo_seconds / med[c] for c in med}  # solo timed with the first B
            rows.append(row)
            print(json.dumps({k: row[k] for k in row if k != "detail"}), file=sys.stderr, flush=True)
    result = {"environment": env, "probe": rep.summary() | {"seconds_this_run": probe_s}, "args": vars(args)
              | {"out": str(args.out)}, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    _markdown(result)
    return 0


def _markdown(result) -> None:
    env = result["environment"]
    print(f"CPU: {env['cpu']}, torch {env['torch']}, {env['threads']} threads")
    print()
    print("| set | B | n | invariant = solo | gate = solo | bi = bi-solo | none = solo | invariant / none "
          "| gate / none | bi / none | gate vs solo | invariant vs solo | gate triggers | audits | drift |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in result["rows"]:
        n, same, vn, vs = r["prompts"], r["identical"], r.get("vs_none", {}), r.get("speedup_vs_solo", {})
        d = r["detail"].get("gate", {})

        def f(x, fmt="{:.2f}x"):
            return "-" if x is None else fmt.format(x)

        trig = f"{100 * d['triggers'] / d['steps']:.1f}%" if d.get("steps") else "-"
        print(f"| {r['set']} | {r['batch_size']} | {n} | {same.get('invariant', '-')}/{n} | {same.get('gate', '-')}/{n} "
              f"| {same.get('invariant-bi', '-')}/{n} | {same.get('none', '-')}/{n} | {f(vn.get('invariant'))} "
              f"| {f(vn.get('gate'))} | {f(vn.get('invariant-bi'))} | {f(vs.get('gate'))} | {f(vs.get('invariant'))} "
              f"| {trig} | {d.get('audits', '-')} | {d.get('drift_events', '-')} |")


if __name__ == "__main__":
    raise SystemExit(main())
