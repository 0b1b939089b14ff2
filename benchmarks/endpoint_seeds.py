"""The seed audit against real servers: llama.cpp's llama-server and vLLM's CPU build.

For each engine and sampling configuration, ``verify --endpoint`` with seeded sampling: each
prompt alone (its draw seed as ``seed``), again alone with the same seed and with another
(does the server honour seeds?), and with B-1 others in flight (solo against under load). The
servers are started on free ports and stopped at the end.

    python benchmarks/endpoint_seeds.py --engines llama,vllm --sets chat --limit 16 --out bench-out/seeds.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment  # noqa: E402

CONFIGS = {"greedy": [], "t0.7-p0.9": ["--temperature", "0.7", "--top-p", "0.9"],
           "t1.0-p0.9": ["--temperature", "1.0", "--top-p", "0.9"],
           "t0.7-k50": ["--temperature", "0.7", "--top-k", "50"]}


def _verify(url: str, spec: str, args, flags: list[str], batch: int, note: str) -> dict:
    from mgaudit.verify import VerifyConfig, verify

    kw = dict(zip([f.lstrip("-").replace("-", "_") for f in flags[::2]], flags[1::2]))
    kw = {k: (int(v) if k == "top_k" else float(v)) for k, v in kw.items()}
    cfg = VerifyConfig(prompts=spec, endpoint=url, tokenizer="smollm2", batch_size=batch, limit=args.limit,
                       max_new_tokens=args.max_new_tokens, engine_note=note, sample_seed=args.sample_seed,
                       reference_cache=False, threshold=args.threshold, **kw)
    t0 = time.perf_counter()
    rep = verify(cfg)
    s = rep["summary"]
    return {"set": spec, "batch_size": batch, "identical": s["identical"], "sequences": s["sequences"],
            "seeds": s.get("seeds"), "severity": s["severity"]["counts"], "teacher_forced": s["teacher_forced"],
            "seconds": time.perf_counter() - t0,
            "first_divergences": [r["first_divergence"] for r in rep["sequences"] if not r["identical"]]}


def llama(args) -> list[dict]:
    from mgaudit.endpoint.llama_server import LlamaServer, build_llama_server
    from mgaudit.models import default_gguf

    info = build_llama_server()
    out = []
    with LlamaServer(info.binary, default_gguf(), slots=args.llama_slots) as srv:
        for cfg in args.configs.split(","):
            for spec in args.sets.split(","):
                r = _verify(srv.url, spec, args, CONFIGS[cfg], args.llama_slots, f"llama-server -np {args.llama_slots}")
                out.append({"engine": "llama.cpp", "config": cfg, **r})
                print(json.dumps(out[-1]), file=sys.stderr, flush=True)
    return out


def vllm(args) -> list[dict]:
    from mgaudit.endpoint.vllm_server import VllmServer, ensure_vllm
    from mgaudit.models import fetch_default_model

    python = ensure_vllm(log=lambda m: print(m, file=sys.stderr))
    out = []
    with VllmServer(python, fetch_default_model("bfloat16"), max_num_seqs=args.vllm_seqs, prefix_caching=False) as srv:
        for cfg in args.configs.split(","):
            for spec in args.sets.split(","):
                r = _verify(srv.url, spec, args, CONFIGS[cfg], args.vllm_seqs, srv.describe())
                out.append({"engine": "vllm", "config": cfg, **r})
                print(json.dumps(out[-1]), file=sys.stderr, flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", default="llama,vllm")
    ap.add_argument("--sets", default="chat")
    ap.add_argument("--configs", default="t0.7-p0.9,t0.7-k50")
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--sample-seed", type=int, default=0)
    ap.add_argument("--threshold", type=float, default=0.25, help="tau: classifies greedy differences")
    ap.add_argument("--llama-slots", type=int, default=8)
    ap.add_argument("--vllm-seqs", type=int, default=16)
    ap.add_argument("--out", type=Path, default=Path("bench-out/endpoint_seeds.json"))
    args = ap.parse_args(argv)
    result = {"environment": environment(), "args": {k: str(v) for k, v in vars(args).items()}, "runs": []}
    for engine in args.engines.split(","):
        result["runs"] += {"llama": llama, "vllm": vllm}[engine](args)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
