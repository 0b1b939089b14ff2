"""A MarginGate-paper-style table for the user's own model and machine, in one run.

For each prompt set and batch size:

1. ``scan`` (solo vs left-padded batch): flip rate of synchronous steps and
   sequences diverged free-running (the paper's Table 1);
2. the gate is calibrated on ONE set (``--calibrate-on``) and applied to all
   (transfer: recall and trigger rate on the others);
3. every policy decodes the set; each output is compared token by token with
   the solo output measured in the same run:
   ``none`` (what generate gives), ``always`` (LLM-42-style, every step
   verified), ``gate-paper`` (the paper's design: padded batch, low-margin steps
   verified on the batched cache), ``gate`` (mgaudit's: ragged fast path +
   verifier), ``invariant`` (ragged fast path, no verifier);
   reported: sequences identical to solo, trigger rate, wall time, tokens/s,
   latency increment over ``none`` and the ratio of increments always/gate.

Writes paper_table.md, paper_table.json and paper_table.png to ``--out``.

    python benchmarks/paper_table.py --out bench-out            # defaults: ~10 min on 2 CPU cores
    python benchmarks/paper_table.py --sets math,code,chat,humaneval --batch-sizes 4,8,16 --limit 32
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment  # noqa: E402

POLICIES = [
    ("none", dict(name="none")),
    ("always", dict(name="always")),
    ("gate-paper", dict(name="gate", fast_path="padded")),
    ("gate", dict(name="gate", fast_path="ragged")),
    ("invariant", dict(name="invariant")),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    ap.add_argument("--sets", default="math,code,chat")
    ap.add_argument("--calibrate-on", default="math")
    ap.add_argument("--batch-sizes", default="16")
    ap.add_argument("--limit", type=int, default=12)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--policies", default=",".join(p for p, _ in POLICIES))
    ap.add_argument("--gate", type=Path, default=None,
                    help="Use this gate.json instead of scanning and calibrating (policy runs only).")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)

    import torch

    from mgaudit.calibrate import CalibrateConfig, calibrate
    from mgaudit.decoding.stock import solo_decode
    from mgaudit.errors import NoFlipsError
    from mgaudit.decoding.policies import DecodePolicy, decode
    from mgaudit.models import load_model
    from mgaudit.prompts import encode_prompt, load_prompts
    from mgaudit.scan import ScanConfig, parse_batch_sizes, scan

    sets = [s for s in args.sets.split(",") if s]
    sizes = parse_batch_sizes(args.batch_sizes)
    wanted = [p for p in args.policies.split(",") if p]
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    lm = load_model(args.model, "bfloat16", args.device)
    eos, pad = lm.eos_token_ids, lm.pad_token_id

    def log(msg):
        print(f"[{time.perf_counter() - t_start:6.0f}s] {msg}", file=sys.stderr, flush=True)

    # 1. scans
    scans = {}
    for s in (sets if args.gate is None else []):
        log(f"scan {s}")
        res = scan(ScanConfig(prompts=s, out=args.out / f"traces-{s}", model=args.model, device=args.device,
                              batch_sizes=sizes, max_new_tokens=args.max_new_tokens, limit=args.limit,
                              overwrite=True), loaded=lm)
        scans[s] = res.summary
    # 2. calibrate on one set, transfer to the others (or take a given gate)
    if args.gate is not None:
        from mgaudit.formats.gate import load_gate

        gate = load_gate(args.gate)
        tau, method, figures, transfer = gate["threshold"], f"from {args.gate}", gate.get("calibration", {}), []
    else:
        log(f"calibrate on {args.calibrate_on}")
        cal_cfg = CalibrateConfig(traces=[args.out / f"traces-{args.calibrate_on}"], out=args.out / "gate.json",
                                  eval_traces=[args.out / f"traces-{s}" for s in sets if s != args.calibrate_on])
        try:
            cal = calibrate(cal_cfg)
        except NoFlipsError as exc:  # no flips to fit on: fall back to the perturbation bound
            log(f"{exc.message}; using --method bound")
            cal_cfg.method = "bound"
            cal = calibrate(cal_cfg)
        tau, method, figures, transfer = cal.threshold, cal.method, cal.figures, cal.transfer
    # 3. policies, each compared token by token with the solo output of this run
    results = []
    with torch.inference_mode():
        for s in sets:
            ps = load_prompts(s, limit=args.limit)
            ids = [encode_prompt(lm.tokenizer, p) for p in ps.prompts]
            log(f"solo reference {s}")
            t0 = time.perf_counter()
            solos = [solo_decode(lm.model, p, args.max_new_tokens, eos).tokens for p in ids]
            solo_s = time.perf_counter() - t0
            for b in sizes:
                block = []
                for name, kw in POLICIES:
                    if name not in wanted:
                        continue
                    pol = DecodePolicy(threshold=tau if kw["name"] == "gate" else None, **kw)
                    log(f"{s} B={b} {name}")
                    o = decode(lm.model, ids, pol, b, args.max_new_tokens, eos, pad)
                    block.append(policy_record(s, b, name, o, solos, solo_s))
                add_increments(block)
                results.extend(block)
    out = {
        "environment": environment(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "threshold": tau, "calibrated_on": args.calibrate_on if args.gate is None else None, "method": method,
        "calibration": figures, "transfer": transfer,
        "flips": {s: scans[s]["by_condition"] for s in scans},
        "policies": results,
        "elapsed_seconds": time.perf_counter() - t_start,
    }
    (args.out / "paper_table.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
    md = render_markdown(out)
    (args.out / "paper_table.md").write_text(md)
    plot(out, args.out / "paper_table.png")
    print(md)
    log("done")
    return 0


def policy_record(set_name, batch_size, policy, output, solos, solo_seconds) -> dict:
    seqs = output.sequences
    steps = sum(len(q.tokens) for q in seqs)
    return {
        "set": set_name, "batch_size": batch_size, "policy": policy,
        "identical": sum(q.tokens == r for q, r in zip(seqs, solos)), "sequences": len(seqs),
        "trigger_rate": sum(q.triggers for q in seqs) / steps if steps else 0.0,
        "repairs": sum(q.repairs for q in seqs),
        "seconds": output.seconds, "tokens_per_second": steps / output.seconds,
        "solo_seconds": solo_seconds, "solo_tokens_per_second": sum(len(x) for x in solos) / solo_seconds,
        "speedup_vs_solo": solo_seconds / output.seconds, "max_rows": output.max_rows,
    }


def add_increments(block: list[dict]) -> None:
    """Latency increment of each policy over ``none`` and the always/gate ratio (one set, one batch size)."""
    by = {r["policy"]: r for r in block}
    none = by.get("none")
    if none is None:
        return
    for r in block:
        r["increment_over_none"] = r["seconds"] - none["seconds"]
        r["relative_increment"] = r["seconds"] / none["seconds"] - 1
    if "always" in by and "gate" in by and by["gate"]["increment_over_none"] > 0:
        by["gate"]["always_over_gate_increment"] = by["always"]["increment_over_none"] / by["gate"]["increment_over_none"]


def render_markdown(out) -> str:
    lines = [f"Model: {out['args']['model']} on {out['environment']['cpu']} "
             f"(torch {out['environment']['torch']}, {out['environment']['threads']} threads); "
             f"{out['args']['limit']} prompts per set, {out['args']['max_new_tokens']} new tokens.", ""]
    lines += ["### Flips: solo vs left-padded batch (paper Table 1)", "",
              "| set | batch | sync steps | flips | flip rate | max batched margin at a flip | sequences diverged (free) |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for s, entries in out["flips"].items():
        for e in entries:
            sy, fr = e.get("sync", {}), e.get("free", {})
            mm = sy.get("max_batched_margin_at_flip")
            lines.append(f"| {s} | {e['batch_size']} | {sy.get('steps')} | {sy.get('flips')} | "
                         f"{100 * sy.get('flip_rate', 0):.2f}% | {'-' if mm is None else f'{mm:.4g}'} | "
                         f"{fr.get('sequences_diverged')}/{fr.get('sequences')} |")
    origin = f"calibrated on {out['calibrated_on']}" if out["calibrated_on"] else "given"
    lines += ["", f"### Gate {origin} ({out['method']}): tau = {out['threshold']:.4g} "
                  "(verify when batched margin < tau)", "",
              "| traces | recall | trigger rate | flips missed |", "|---|---:|---:|---:|"]
    c = out["calibration"]
    if c:
        rc = c.get("recall")
        lines.append(f"| {out['calibrated_on'] or 'its calibration traces'} | {'-' if rc is None else f'{rc:.3f}'} | "
                     f"{100 * c['trigger_rate']:.1f}% | {c['flips_missed']} |")
    for t in out["transfer"] or []:
        f = t.get("figures", t)
        rec = f.get("recall")
        lines.append(f"| {Path(str(t.get('traces', t.get('path', '?')))).name} | "
                     f"{'-' if rec is None else f'{rec:.3f}'} | {100 * f['trigger_rate']:.1f}% | {f['flips_missed']} |")
    lines += ["", "### Policies (every output compared token by token with solo, in this run)", "",
              "| set | batch | policy | identical to solo | trigger rate | repairs | wall s | tokens/s | "
              "increment over none | always/gate increment | speed-up vs solo |",
              "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in out["policies"]:
        ratio = r.get("always_over_gate_increment") if r["policy"] == "gate" else None
        lines.append(f"| {r['set']} | {r['batch_size']} | {r['policy']} | {r['identical']}/{r['sequences']} | "
                     f"{100 * r['trigger_rate']:.1f}% | {r['repairs']} | {r['seconds']:.1f} | "
                     f"{r['tokens_per_second']:.0f} | "
                     f"{_inc(r)} | "
                     f"{'-' if ratio is None else f'{ratio:.1f}x'} | {r['speedup_vs_solo']:.2f}x |")
    sets = list(dict.fromkeys(r["set"] for r in out["policies"]))
    lines.append("\nSolo (batch size 1) reference: "
                 + ", ".join(f"{s}: {next(r['solo_seconds'] for r in out['policies'] if r['set'] == s):.1f} s"
                             for s in sets) + f". Whole run: {out['elapsed_seconds']:.0f} s.\n")
    return "\n".join(lines) + "\n"


def _inc(r) -> str:
    inc = r.get("increment_over_none")
    if inc is None:
        return "-"
    return f"{inc:+.1f} s ({100 * r['relative_increment']:+.0f}%)"


def plot(out, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    markers = {"none": "o", "always": "s", "gate-paper": "v", "gate": "D", "invariant": "^"}
    for pol in markers:
        rs = [r for r in out["policies"] if r["policy"] == pol and r.get("relative_increment") is not None]
        if not rs:
            continue
        ax.scatter([100 * r["trigger_rate"] for r in rs], [100 * r["relative_increment"] for r in rs],
                   marker=markers[pol], label=f"{pol} ({sum(r['identical'] for r in rs)}/"
                                              f"{sum(r['sequences'] for r in rs)} exact)", s=50)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("verifier trigger rate (% of steps)")
    ax.set_ylabel("latency increment over none (%)")
    ax.set_title("Cost of exactness per policy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
