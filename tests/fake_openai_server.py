"""A small OpenAI-compatible server for endpoint tests (no model): deterministic answers that
change under load, and switches for the failure modes the client must survive.

Each prompt's answer is a fixed token sequence derived from the prompt text. Step 3 has a
small top-1/top-2 margin; while two or more requests are in flight, prompts whose hash is
even pick the runner-up there, so their sequences part from solo at step 3. With ``flip_at``
set, answers change only where at least that many requests were in flight while one ran (every
prompt then picks the runner-up at step 3): a server whose onset is ``flip_at``.

``behaviour`` (settable while running): ``ok``, ``no_logprobs`` (``logprobs: null``),
``legacy`` (OpenAI legacy completions logprobs with strings and no ids), ``short``
(answers under load stop after 2 tokens), ``fail`` (every POST answers HTTP 503),
``fail_after`` (POSTs after the first ``fail_after_n`` answer 503), ``drop_after`` (they close the
connection without an answer), ``flaky`` (every ``fail_every``-th POST answers 503: a retry gets
through). ``/tokenize`` answers 404 outside the request count.

``engine="vllm"`` answers ``/version`` and ``/metrics`` as vLLM does with prefix caching on (block
size 16): a request without a ``cache_salt`` whose prompt was sent before without one counts its
5 prompt tokens as cache hits in ``vllm:prefix_cache_hits_total``. ``bodies`` keeps every POST body.
"""

from __future__ import annotations

import hashlib
import json

from http_server import CompletionServer

FLIP_STEP = 3


class FakeServer(CompletionServer):
    server_header = "fake-openai/1.0"

    def __init__(self, delay: float = 0.15):
        super().__init__(delay)
        self.behaviour = "ok"
        self.fail_after_n = 0
        self.flip_at: int | None = None
        self.fail_every = 0
        self.engine: str | None = None
        self.bodies: list[dict] = []
        self.cache_hits, self.cached = 0, set()

    # ------------------------------------------------------------------ answers

    def answer(self, body: dict, chat: bool, loaded: bool, peak: int = 1) -> dict:
        text = json.dumps(body.get("messages") if chat else body.get("prompt"), sort_keys=True)
        h = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
        n = int(body.get("max_tokens", 16))
        if self.behaviour == "short" and loaded:
            n = min(n, 2)
        content, ids = [], []
        for t in range(n):
            tid = 100 + (h + 37 * t) % 900
            margin = 0.05 if t == FLIP_STEP else 1.0 + (t % 3)
            runner = tid + 1
            top1, top2 = -0.25, -0.25 - margin
            changed = h % 2 == 0 and loaded if self.flip_at is None else peak >= self.flip_at
            if changed and t == FLIP_STEP:
                tid, runner = runner, tid  # the runner-up wins under load
                top1, top2 = -0.25, -0.27
            ids.append(tid)
            content.append({"id": tid, "token": f"w{tid}", "logprob": top1,
                            "top_logprobs": [{"id": tid, "token": f"w{tid}", "logprob": top1},
                                             {"id": runner, "token": f"w{runner}", "logprob": top2}]})
        finish = "length" if n == int(body.get("max_tokens", 16)) else "stop"
        if self.behaviour == "no_logprobs":
            logprobs = None
        elif self.behaviour == "legacy":
            logprobs = {"tokens": [c["token"] for c in content], "token_logprobs": [c["logprob"] for c in content],
                        "top_logprobs": [{e["token"]: e["logprob"] for e in c["top_logprobs"]} for c in content]}
        else:
            logprobs = {"content": content}
        out_text = " ".join(c["token"] for c in content)
        choice = {"index": 0, "finish_reason": finish, "logprobs": logprobs}
        if chat:
            choice["message"] = {"role": "assistant", "content": out_text}
        else:
            choice["text"] = out_text
        return {"object": "chat.completion" if chat else "text_completion", "choices": [choice],
                "usage": {"prompt_tokens": 5, "completion_tokens": n}}

    def get(self, path: str) -> tuple[int, dict | str]:
        if path == "/v1/models":
            return 200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}
        if self.engine == "vllm" and path == "/version":
            return 200, {"version": "0.0-fake"}
        if self.engine == "vllm" and path == "/metrics":
            return 200, ('vllm:cache_config_info{block_size="16",enable_prefix_caching="True"} 1.0\n'
                         f'vllm:prefix_cache_hits_total{{engine="0"}} {float(self.cache_hits)}\n')
        return 404, {"error": "not found"}

    def instant(self, path: str, body: dict) -> tuple[int, dict] | None:
        return (404, {"error": "not found"}) if path == "/tokenize" else None

    def refuse(self, n_post: int) -> tuple[int, dict] | None:
        if self.behaviour == "fail" or (self.behaviour == "fail_after" and n_post > self.fail_after_n) or \
                (self.behaviour == "flaky" and n_post % self.fail_every == 0):
            return 503, {"error": "overloaded"}
        return None

    def post(self, path: str, body: dict, loaded: bool, n_post: int) -> tuple[int, dict] | None:
        if self.behaviour == "drop_after" and n_post > self.fail_after_n:
            return None
        if path in ("/v1/chat/completions", "/v1/completions"):
            self.bodies.append(body)
            if self.engine == "vllm" and "cache_salt" not in body:
                key = json.dumps(body.get("messages") or body.get("prompt"), sort_keys=True)
                self.cache_hits += 5 if key in self.cached else 0
                self.cached.add(key)
            return 200, self.answer(body, path.endswith("chat/completions"), loaded, self.peak.get(n_post, 1))
        return 404, {"error": "not found"}


if __name__ == "__main__":  # a standalone fake server, e.g. for benchmarks/bench_endpoint.py --fake
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--delay", type=float, default=0.0)
    args = ap.parse_args()
    srv = FakeServer(delay=args.delay)
    print(srv.url, flush=True)
    srv.httpd.serve_forever()
