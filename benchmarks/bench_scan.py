"""Scan's hot loops against Hugging Face ``generate``, side by side in one run.

For the same prompts it times, interleaved round by round (so machine noise hits
both sides alike):

* solo: ``model.generate(do_sample=False)`` one prompt at a time vs scan's solo
  reference (``engine.solo_decode``, which also records top-1/top-2 logits and
  keeps the logits for the comparisons);
* batched: ``generate`` on a left-padded batch vs scan's free-running batched
  replay (``engine.padded_decode`` recording margins and max |dlogit| against
  the solo reference).

Reports tokens/s and the ratios scan/HF (median over rounds). Usage:

    python benchmarks/bench_scan.py --prompts math --limit 16 --batch-size 16 --max-new-tokens 64 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, median, timed  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", default="math")
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    args = ap.parse_args(argv)

    from mgaudit.decoding.stock import padded_decode, solo_decode
    from mgaudit.models import load_model
    from mgaudit.prompts import encode_prompt, load_prompts

    lm = load_model(args.model, "bfloat16", args.device)
    model, tok = lm.model, lm.tokenizer
    prompts = load_prompts(args.prompts, limit=args.limit).prompts
    ids = [encode_prompt(tok, p) for p in prompts]
    eos, pad = lm.eos_token_ids, lm.pad_token_id
    n_new = args.max_new_tokens
    tok.padding_side = "left"


    batches = [ids[i:i + args.batch_size] for i in range(0, len(ids), args.batch_size)]

    def hf_batched():
        n = 0
        for b in batches:
            enc = tok.pad({"input_ids": b}, return_tensors="pt").to(model.device)
            y = model.generate(**enc, max_new_tokens=n_new, do_sample=False, pad_token_id=pad)
            gen = y[:, enc["input_ids"].shape[1]:]
            for row in gen.tolist():  # count up to and including EOS, as scan does
                k = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
                n += k
        return n

    refs = [solo_decode(model, p, n_new, eos, keep_logits=True) for p in ids]  # warm-up + reference

    def mg_batched():
        n = 0
        for bi, b in enumerate(batches):
            rr = refs[bi * args.batch_size: bi * args.batch_size + len(b)]
            rows = padded_decode(model, b, n_new, eos, pad, reference=rr)
            n += sum(len(r) for r in rows)
        return n

    # Solo: per prompt, HF and scan back to back (alternating which goes first), so
    # that the machine's drift hits both sides alike.
    solo_pairs = []
    same = True
    with torch.inference_mode():
        for r in range(args.rounds):
            for i, p in enumerate(ids):
                x = torch.tensor([p], device=model.device)

                def hf_one():
                    return model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n_new,
                                          do_sample=False, pad_token_id=pad)[0, len(p):].tolist()

                def mg_one():
                    return solo_decode(model, p, n_new, eos, keep_logits=True)

                if (i + r) % 2 == 0:
                    t_hf, hf_out = timed(hf_one)
                    t_mg, mg_out = timed(mg_one)
                else:
                    t_mg, mg_out = timed(mg_one)
                    t_hf, hf_out = timed(hf_one)
                same = same and mg_out.tokens == hf_out[:len(mg_out.tokens)]
                solo_pairs.append({"prompt": i, "tokens": len(mg_out.tokens), "hf_s": t_hf, "scan_s": t_mg})
            print(f"solo round {r}: HF {sum(q['hf_s'] for q in solo_pairs):.1f} s, "
                  f"scan {sum(q['scan_s'] for q in solo_pairs):.1f} s", file=sys.stderr)
        batched_rows = []
        for r in range(args.rounds):
            order = [("hf", hf_batched), ("scan", mg_batched)]
            if r % 2:
                order.reverse()
            got = {}
            for name, fn in order:
                got[name] = timed(fn)
            (t_hf_b, n_hf_b), (t_mg_b, n_mg_b) = got["hf"], got["scan"]
            batched_rows.append({"round": r, "hf_batched_tok_s": n_hf_b / t_hf_b, "scan_batched_tok_s": n_mg_b / t_mg_b,
                                 "batched_ratio": (n_mg_b / t_mg_b) / (n_hf_b / t_hf_b)})
            print(json.dumps(batched_rows[-1]), file=sys.stderr)
    tokens = sum(q["tokens"] for q in solo_pairs)
    hf_total, mg_total = sum(q["hf_s"] for q in solo_pairs), sum(q["scan_s"] for q in solo_pairs)
    rows = {"solo_pairs": solo_pairs, "batched": batched_rows}
    result = {
        "benchmark": "bench_scan",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": environment(),
        "rounds": rows,
        "solo_tokens_identical_to_generate": same,
        "hf_solo_tok_s": tokens / hf_total, "scan_solo_tok_s": tokens / mg_total,
        "solo_ratio": hf_total / mg_total,
        "median_per_prompt_solo_ratio": median([q["hf_s"] / q["scan_s"] for q in solo_pairs]),
        "median_batched_ratio": median([r["batched_ratio"] for r in batched_rows]),
        "targets": {"solo_ratio": ">= 1.0", "batched_ratio": ">= 0.9"},
    }
    print(f"scan solo / HF generate solo (tokens/s):       {result['solo_ratio']:.3f}x "
          f"(per-prompt median {result['median_per_prompt_solo_ratio']:.3f}x; target >= 1.0; "
          f"solo tokens identical to generate: {same})")
    print(f"scan batched / HF generate padded (tokens/s):  {result['median_batched_ratio']:.3f}x (target >= 0.9)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
