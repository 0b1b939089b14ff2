"""Seeded sampling on this machine: exactness, the price of the sampled gate, the sampler's own cost.

``--sweep``: for each prompt set, sampling configuration and batch size, the policies ``none``,
``gate`` and ``invariant`` decode the prompts sampled (each prompt's draw seed from the sample
seed and its id) and are compared token by token with each prompt sampled alone (the solo
reference, decoded in the same run). Reports sequences identical and the gate's trigger rate.

``--price``: greedy and sampled side by side in one run, configurations interleaved per round
(median over ``--rounds``): ``none``, ``gate``, ``invariant`` greedy and sampled; ratios against
greedy ``none`` and against sampled ``none``, and the trigger rates (with identical counts: the
rate is the one that gave 100 % exactness).

``--cost``: the sampler's own cost (noise and masks) per decode step at ``--batch-size`` rows:
``SampleRule.pick`` timed on the logits of each step of a real decode (the fastest of
``--repeats`` calls, interleaved with the greedy argmax/top-2 it replaces; median over steps),
against the step's forward (the batch's ``none`` step, median over steps). The sampler's own
cost is ``extra_over_greedy_ms``: what a sampled step spends beyond the greedy step's pick.

    python benchmarks/bench_sampling.py --sweep --sets math,code,chat --batch-sizes 4,8,16 --limit 16
    python benchmarks/bench_sampling.py --price --sets chat --batch-sizes 16 --rounds 3
    python benchmarks/bench_sampling.py --cost --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, median  # noqa: E402

CONFIGS = {"t0.7-p0.9": dict(temperature=0.7, top_p=0.9), "t1.0-p0.9": dict(temperature=1.0, top_p=0.9),
           "t0.7-k50": dict(temperature=0.7, top_k=50), "t1.0": dict(temperature=1.0),
           "t0.8-k40-p0.95-minp0.05": dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05)}


def _sampling(name: str, seed: int):
    from mgaudit.decoding.sampling import Sampling

    return Sampling(seed=seed, **CONFIGS[name]) if name != "greedy" else Sampling()


def _prompts(lm, spec: str, limit: int):
    from mgaudit.prompts import encode_prompt, load_prompts

    ps = load_prompts(spec, limit=limit)
    return ps.name, [p.id for p in ps.prompts], [encode_prompt(lm.tokenizer, p) for p in ps.prompts]


def _refs(lm, ids, pids, sampling, tokens):
    from mgaudit.decoding.policies import reference_decode

    seeds = [sampling.draw_seed(p) for p in pids]
    return seeds, [reference_decode(lm.model, p, tokens, lm.eos_token_ids, sampling=sampling, seed=s).tokens
                   for p, s in zip(ids, seeds)]


def _policy(name: str, tau: float):
    from mgaudit.decoding.policies import DecodePolicy

    return DecodePolicy("gate", tau) if name == "gate" else DecodePolicy(name)


def sweep(lm, args, rep) -> list[dict]:
    from mgaudit.decoding.policies import decode

    rows = []
    for spec in args.sets.split(","):
        name, pids, ids = _prompts(lm, spec, args.limit)
        for cfg in args.configs.split(","):
            sampling = _sampling(cfg, args.sample_seed)
            t0 = time.perf_counter()
            seeds, refs = _refs(lm, ids, pids, sampling, args.max_new_tokens)
            ref_s = time.perf_counter() - t0
            for B in (int(b) for b in args.batch_sizes.split(",")):
                row = {"set": name, "config": cfg, "batch_size": B, "prompts": len(ids), "reference_seconds": ref_s}
                for pol in ("none", "gate", "invariant"):
                    out = decode(lm.model, ids, _policy(pol, args.threshold), B, args.max_new_tokens,
                                 lm.eos_token_ids, lm.pad_token_id, probe_report=rep, sampling=sampling, seeds=seeds)
                    steps = sum(len(s.tokens) for s in out.sequences)
                    row[pol] = {"identical": sum(s.tokens == r for s, r in zip(out.sequences, refs)),
                                "seconds": out.seconds, "steps": steps,
                                "trigger_rate": sum(s.triggers for s in out.sequences) / steps if steps else 0.0,
                                "audits": sum(s.audits for s in out.sequences), "drift": len(out.drift_events)}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def price(lm, args, rep) -> list[dict]:
    from mgaudit.decoding.policies import decode

    rows = []
    cfg = args.configs.split(",")[0]
    for spec in args.sets.split(","):
        name, pids, ids = _prompts(lm, spec, args.limit)
        runs = [(s, p) for s in ("greedy", cfg) for p in ("none", "gate", "invariant")]
        refs = {s: _refs(lm, ids, pids, _sampling(s, args.sample_seed), args.max_new_tokens) for s in ("greedy", cfg)}
        for B in (int(b) for b in args.batch_sizes.split(",")):
            times = {r: [] for r in runs}
            detail = {}
            for _ in range(args.rounds):
                for s, p in runs:
                    seeds, ref = refs[s]
                    out = decode(lm.model, ids, _policy(p, args.threshold), B, args.max_new_tokens, lm.eos_token_ids,
                                 lm.pad_token_id, probe_report=rep, sampling=_sampling(s, args.sample_seed),
                                 seeds=seeds)
                    times[(s, p)].append(out.seconds)
                    steps = sum(len(x.tokens) for x in out.sequences)
                    detail[f"{s}/{p}"] = {"identical": sum(x.tokens == r for x, r in zip(out.sequences, ref)),
                                          "trigger_rate": sum(x.triggers for x in out.sequences) / steps,
                                          "audits": sum(x.audits for x in out.sequences),
                                          "drift": len(out.drift_events), "steps": steps}
            med = {f"{s}/{p}": median(v) for (s, p), v in times.items()}
            row = {"set": name, "config": cfg, "batch_size": B, "prompts": len(ids), "seconds": med, "detail": detail,
                   "vs_greedy_none": {k: v / med["greedy/none"] for k, v in med.items()},
                   "vs_sampled_none": {k: v / med[f"{cfg}/none"] for k, v in med.items()}}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def _fastest(fn, repeats: int) -> float:
    """The fastest of ``repeats`` calls, in ms (the least disturbed by other jobs on the machine)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return 1e3 * best


def cost(lm, args) -> dict:
    """The sampler's time per step against the step, side by side: after each decode step of a
    real batch (its forward timed once), every configuration's pick and the greedy argmax/top-2
    are timed on that step's logits (each the fastest of ``--repeats`` calls, interleaved), so a
    machine that slows down mid-run slows both sides; medians over steps."""
    import torch

    from mgaudit.decoding.loop import padded_prefill
    from mgaudit.decoding.sampling import SampleRule
    from mgaudit.decoding.step import top2_stats

    _, pids, ids = _prompts(lm, args.sets.split(",")[0], args.batch_size)
    B = len(ids)
    rules = {}
    for cfg in CONFIGS:
        s = _sampling(cfg, args.sample_seed)
        rules[cfg] = SampleRule(s, [s.draw_seed(p) for p in pids])
    logits, cache, positions, advance = padded_prefill(lm.model, ids, lm.pad_token_id)
    step_ms, times = [], {name: [] for name in ["greedy", *CONFIGS]}
    with torch.inference_mode():
        for i in range(args.cost_steps):
            calls = {"greedy": lambda: top2_stats(logits)}
            calls.update({cfg: (lambda r=rule: r.pick(logits, i)) for cfg, rule in rules.items()})
            best = dict.fromkeys(calls, float("inf"))
            for _ in range(args.repeats):  # interleaved: each repeat times every configuration once
                for name, fn in calls.items():
                    best[name] = min(best[name], _fastest(fn, 1))
            for name, ms in best.items():
                times[name].append(ms)
            fed = torch.argmax(logits, -1)[:, None]
            positions = positions + 1
            t0 = time.perf_counter()
            logits = advance(cache, fed, positions)
            step_ms.append(1e3 * (time.perf_counter() - t0))
    forward, greedy = median(step_ms), median(times["greedy"])
    out = {"batch_size": B, "steps": len(step_ms), "forward_ms": forward, "forward_ms_fastest": min(step_ms),
           "greedy_top2_ms": greedy, "greedy_share_of_step": greedy / (forward + greedy)}
    for cfg in CONFIGS:
        ms = median(times[cfg])
        out[cfg] = {"pick_ms": ms, "share_of_step": ms / (forward + ms),
                    "extra_over_greedy_ms": ms - greedy, "extra_share_of_greedy_step": (ms - greedy) / (forward + greedy)}
        print(json.dumps({cfg: out[cfg]}), file=sys.stderr, flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--price", action="store_true")
    ap.add_argument("--cost", action="store_true")
    ap.add_argument("--sets", default="chat")
    ap.add_argument("--configs", default="t0.7-p0.9,t1.0-p0.9,t0.7-k50")
    ap.add_argument("--batch-sizes", default="16")
    ap.add_argument("--batch-size", type=int, default=16, help="--cost: rows of the batch")
    ap.add_argument("--cost-steps", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=7, help="--cost: each timing is the fastest of this many")
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--threshold", type=float, default=0.25)
    ap.add_argument("--sample-seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=Path("bench-out/bench_sampling.json"))
    args = ap.parse_args(argv)

    from mgaudit.decoding.invariance import probe
    from mgaudit.models import load_model

    lm = load_model(args.model, device=args.device)
    env = environment()
    print(f"# {env['cpu']}, torch {env['torch']}, {env['threads']} threads", file=sys.stderr)
    result = {"environment": env, "args": {k: str(v) for k, v in vars(args).items()}}
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    rep = probe(lm.model, max(sizes)) if (args.sweep or args.price) else None
    if args.sweep:
        result["sweep"] = sweep(lm, args, rep)
    if args.price:
        result["price"] = price(lm, args, rep)
    if args.cost:
        result["cost"] = cost(lm, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
