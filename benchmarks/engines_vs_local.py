"""A real serving engine against the local model: `verify --endpoint URL --reference local`, measured.

For each prompt set and each number of requests in flight, every answer of the engine is compared
with the local model's solo output (stock `generate` at batch size 1, bf16, same weights), free-running
and teacher-forced, and every difference is classified with a gate calibrated on the local model's
own batch noise: within noise (the local model's margin there is below tau) or anomalous.

    python benchmarks/engines_vs_local.py --engine llama --out bench-out/llama-vs-local
    python benchmarks/engines_vs_local.py --engine vllm --out bench-out/vllm-vs-local
    python benchmarks/engines_vs_local.py --endpoint http://127.0.0.1:8000/v1 --out bench-out/x

Without ``--gate`` the gate is fitted first: a local scan of ``--calibrate-on`` at batch sizes 4, 8
and 16, then ``calibrate`` (recall method; the bound method where the scan has no flips). Writes
``result.json`` and ``result.md`` (the table docs/endpoints.md shows) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def fit_gate(lm, args, log) -> Path:
    from mgaudit.calibrate import CalibrateConfig, calibrate
    from mgaudit.errors import NoFlipsError
    from mgaudit.scan import ScanConfig, scan

    traces = args.out / "local-scan"
    log(f"fitting the gate on the local model: scan {args.calibrate_on} -> {traces}")
    scan(ScanConfig(prompts=args.calibrate_on, out=traces, batch_sizes=[4, 8, 16], max_new_tokens=args.max_new_tokens,
                    limit=args.limit, resume=traces.exists()), loaded=lm, log=log)
    gate = args.out / "gate.json"
    cfg = CalibrateConfig(traces=[traces], out=gate)
    try:
        calibrate(cfg)
    except NoFlipsError:
        cfg.method = "bound"
        calibrate(cfg)
    return gate


def start_engine(args, log):
    """(server object to stop, its URL, an engine note) for --engine; (None, --endpoint, note) otherwise."""
    top = max(args.in_flight)
    if args.engine == "llama":
        from mgaudit.endpoint.llama_server import LlamaServer, build_llama_server
        from mgaudit.models import default_gguf

        srv = LlamaServer(build_llama_server(log=log).binary, default_gguf(), slots=top, ctx=1024 * top,
                          log_path=args.out / "llama-server.log").start()
        return srv, srv.url, f"llama-server (llama-cpp-python 0.3.36 sources) -np {top} -c {1024 * top} -t {srv.threads}"
    if args.engine == "vllm":
        from mgaudit.endpoint.vllm_server import VllmServer, ensure_vllm
        from mgaudit.models import fetch_default_model

        srv = VllmServer(ensure_vllm(log=log), fetch_default_model("bfloat16"), max_num_seqs=max(16, top),
                         prefix_caching=not args.no_prefix_caching, log_path=args.out / "vllm.log").start()
        log(f"vLLM answered after {srv.started_in:.0f} s")
        return srv, srv.url, srv.describe()
    return None, args.endpoint, args.engine_note


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", choices=("llama", "vllm"), default=None)
    ap.add_argument("--endpoint", default=None, help="a running server instead of --engine")
    ap.add_argument("--engine-note", default=None)
    ap.add_argument("--sets", default="math,chat,code")
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--in-flight", default="1,8", help="requests in flight (1: alone)")
    ap.add_argument("--gate", type=Path, default=None)
    ap.add_argument("--calibrate-on", default="math")
    ap.add_argument("--no-prefix-caching", action="store_true", help="vLLM: --no-enable-prefix-caching")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    args.in_flight = [int(x) for x in args.in_flight.split(",")]
    if (args.engine is None) == (args.endpoint is None):
        ap.error("give --engine or --endpoint")
    args.out.mkdir(parents=True, exist_ok=True)

    from mgaudit.machine import describe
    from mgaudit.models import load_model
    from mgaudit.verify import VerifyConfig, verify

    def log(m: str) -> None:
        print(m, file=sys.stderr, flush=True)

    lm = load_model("smollm2")
    gate = args.gate or fit_gate(lm, args, log)
    t_all = time.perf_counter()
    srv, url, note = start_engine(args, log)
    rows = []
    try:
        for name in args.sets.split(","):
            for n in args.in_flight:
                t0 = time.perf_counter()
                rep = verify(VerifyConfig(prompts=name, endpoint=url, reference="local", batch_size=n,
                                          max_new_tokens=args.max_new_tokens, limit=args.limit, gate=gate,
                                          engine_note=note), loaded=lm, log=log)
                rep.write(args.out / f"report-{name}-{n}.json")
                s, tf, sev = rep["summary"], rep["summary"]["teacher_forced"], rep["summary"]["severity"]
                flips = [d for d in rep["differences"] if d["kind"] == "flip"]
                gaps = [d["reference_gap"] for d in flips if d.get("reference_gap") is not None]
                row = {"set": name, "in_flight": n, "sequences": s["sequences"], "identical": s["identical"],
                       "forced_steps": tf["steps"], "flips": tf["flips"], "flip_rate": tf["flip_rate"],
                       "scored_to_the_end": tf["available"], "route": tf["route"],
                       "requests_per_sequence": tf.get("requests_per_sequence"),
                       "within_noise": sev["counts"]["within_noise"], "anomalous": sev["counts"]["anomalous"],
                       "unknown": sev["counts"]["unknown"], "within_noise_share": sev["within_noise"],
                       "largest_reference_gap": max(gaps, default=None),
                       "first_divergences": s["severity"]["first_divergences"], "seconds": time.perf_counter() - t0}
                rows.append(row)
                log(json.dumps(row))
    finally:
        if srv is not None:
            srv.stop()
    tau = json.loads(Path(gate).read_text())["threshold"]
    meta = {"machine": describe(), "engine": args.engine or "endpoint", "engine_note": note, "gate": str(gate),
            "tau": tau, "limit": args.limit, "max_new_tokens": args.max_new_tokens,
            "seconds": time.perf_counter() - t_all}
    (args.out / "result.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"{note}; {meta['machine']}; tau {tau} (local batch noise, {Path(gate).name}); "
             f"{args.limit} prompts a set, {args.max_new_tokens} tokens",
             "",
             "| set | in flight | identical to local solo | teacher-forced flips / steps | flips within noise "
             "(95 % CI) | anomalous | unknown | largest reference gap at a flip | scoring |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        share = r["within_noise_share"]
        ci = share["ci95"]
        share_txt = "-" if share["rate"] is None else \
            f"{100 * share['rate']:.0f}% [{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]"
        worst = "-" if r["largest_reference_gap"] is None else f"{r['largest_reference_gap']:.3g}"
        rps = r["requests_per_sequence"]
        lines.append(f"| {r['set']} | {r['in_flight']} | {r['identical']}/{r['sequences']} | {r['flips']} / "
                     f"{r['forced_steps']} ({100 * r['flip_rate']:.2f}%) | {share_txt} | {r['anomalous']} | "
                     f"{r['unknown']} | {worst} | "
                     f"{r['route']}{'' if rps is None else f', {rps:.2f} req/seq'} |")
    (args.out / "result.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
