"""Is mgaudit's endpoint client the bottleneck? Request rate at N concurrent requests, side by side.

Two clients send the same requests to the same server, closed loop with ``--concurrency``
requests in flight, interleaved round by round (noise hits both alike):

* bare: ``httpx.AsyncClient`` (same library, same pool limits), POST and read the body;
* mgaudit: :class:`mgaudit.endpoint.client.EndpointClient` (retry wrapper, JSON and logprob
  parsing into a Completion), plus building the trace rows of every answer against a solo
  reference and writing them as one Parquet file atomically, as a scan does.

Reports requests/s of each (median over rounds), the ratio mgaudit/bare, and the client's
own CPU time per request (``time.process_time``: immune to the server's speed and to other
load on the machine). Short answers (``--max-tokens``, default 8) raise the request rate,
which makes client overhead visible. ``--fake`` runs against tests/fake_openai_server.py in
a subprocess with no delay: a server far faster than any model, so the client is the
bottleneck there (the worst case for the ratio).

    python benchmarks/bench_endpoint.py                      # starts llama-server (16 slots) itself
    python benchmarks/bench_endpoint.py --fake --max-tokens 48 --requests 512
    python benchmarks/bench_endpoint.py --endpoint http://127.0.0.1:8080/v1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


async def _bare(url: str, specs, concurrency: int, timeout: float) -> float:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout, connect=3.0)) as client:
        async def one(spec):
            async with sem:
                r = await client.post(f"{url}/{spec.path}", json=spec.body)
                r.raise_for_status()
                return len(r.content)

        t0, c0 = time.perf_counter(), time.process_time()
        await asyncio.gather(*(one(s) for s in specs))
        return time.perf_counter() - t0, time.process_time() - c0


async def _recorded(url: str, specs, refs, ids, concurrency: int, timeout: float, out: Path) -> float:
    from mgaudit.endpoint.client import EndpointClient
    from mgaudit.formats.parquet import atomic_write_table
    from mgaudit.formats.traces import RowKey, pair_rows, rows_to_table

    sem = asyncio.Semaphore(concurrency)
    rows: list[dict] = []
    async with EndpointClient(url, concurrency=concurrency, timeout=timeout) as client:
        async def one(k, spec):
            async with sem:
                c = await client.complete(spec)
            i = ids[k]
            key = RowKey(f"p{i}", i, 0, "in-flight", concurrency, 0, 0, k)
            rows.extend(pair_rows("free", key, refs[i], c))

        t0, c0 = time.perf_counter(), time.process_time()
        await asyncio.gather(*(one(k, s) for k, s in enumerate(specs)))
        atomic_write_table(out / "trace-bench.parquet", rows_to_table(rows, {"bench": True}))
        return time.perf_counter() - t0, time.process_time() - c0


async def _refs(url: str, specs, timeout: float):
    from mgaudit.endpoint.client import EndpointClient

    async with EndpointClient(url, concurrency=1, timeout=timeout) as client:
        return [await client.complete(s) for s in specs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--endpoint", default=None, help="base URL; default: start llama-server with --slots")
    ap.add_argument("--fake", action="store_true", help="use tests/fake_openai_server.py (no delay) instead")
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--prompts", default="chat")
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--requests", type=int, default=64, help="requests per round and client")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--out", type=Path, default=None, help="write the result JSON here")
    args = ap.parse_args()

    from mgaudit.audit.backend import build_requests
    from mgaudit.audit.remote import EndpointBackend
    from mgaudit.audit.steps import Settings
    from mgaudit.endpoint.llama_server import LlamaServer, build_llama_server
    from mgaudit.models import default_gguf
    from mgaudit.machine import describe
    from mgaudit.prompts import load_prompts

    srv = fake = None
    url = args.endpoint
    if args.fake:
        import subprocess

        script = Path(__file__).resolve().parents[1] / "tests" / "fake_openai_server.py"
        fake = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
        url = fake.stdout.readline().strip()
    elif url is None:
        srv = LlamaServer(build_llama_server(log=print).binary, default_gguf(), slots=args.slots,
                          ctx=1024 * args.slots).start()
        url = srv.url
    try:
        backend = EndpointBackend(url)
        info = backend.info
        settings = Settings(args.max_tokens, chat=True)
        requests, _ = build_requests(load_prompts(args.prompts, limit=args.limit), None, settings)
        base = [backend.spec(r, settings) for r in requests]  # as a scan sends them (cold prompt cache)
        backend.close()
        ids = [k % len(base) for k in range(args.requests)]
        specs = [base[i] for i in ids]
        refs = asyncio.run(_refs(url, base, args.timeout))
        bare, rec, bare_cpu, rec_cpu = [], [], [], []
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.rounds):
                tb, cb = asyncio.run(_bare(url, specs, args.concurrency, args.timeout))
                tr, cr = asyncio.run(_recorded(url, specs, refs, ids, args.concurrency, args.timeout, Path(tmp)))
                bare.append(args.requests / tb)
                rec.append(args.requests / tr)
                bare_cpu.append(1000 * cb / args.requests)
                rec_cpu.append(1000 * cr / args.requests)
                print(f"round {r + 1}: bare {bare[-1]:.2f} req/s ({bare_cpu[-1]:.2f} ms CPU/request), "
                      f"mgaudit {rec[-1]:.2f} req/s ({rec_cpu[-1]:.2f} ms CPU/request)", flush=True)
        result = {
            "endpoint": url, "engine": info.engine, "build": (info.fingerprint.get("props") or {}).get("build_info"),
            "slots": info.slots, "threads": srv.threads if srv else None, "cpu": describe(),
            "concurrency": args.concurrency, "requests_per_round": args.requests, "max_tokens": args.max_tokens,
            "rounds": args.rounds, "bare_req_per_s": bare, "mgaudit_req_per_s": rec,
            "bare_median": statistics.median(bare), "mgaudit_median": statistics.median(rec),
            "ratio_of_medians": statistics.median(rec) / statistics.median(bare),
            "ratio_per_round": [r / b for r, b in zip(rec, bare)],
            "bare_cpu_ms_per_request": statistics.median(bare_cpu),
            "mgaudit_cpu_ms_per_request": statistics.median(rec_cpu),
            "server": "fake (tests/fake_openai_server.py, no delay)" if args.fake else "llama-server",
        }
        print(json.dumps(result, indent=2))
        if args.out:
            args.out.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        if srv is not None:
            srv.stop()
        if fake is not None:
            fake.terminate()
            fake.wait(timeout=10)


if __name__ == "__main__":
    main()
