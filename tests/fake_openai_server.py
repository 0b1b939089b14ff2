"""A small OpenAI-compatible server for endpoint tests (no model): deterministic answers that
change under load, and switches for the failure modes the client must survive.

Each prompt's answer is a fixed token sequence derived from the prompt text. Step 3 has a
small top-1/top-2 margin; while two or more requests are in flight, prompts whose hash is
even pick the runner-up there, so their sequences part from solo at step 3.

``behaviour`` (settable while running): ``ok``, ``no_logprobs`` (``logprobs: null``),
``legacy`` (OpenAI legacy completions logprobs with strings and no ids), ``short``
(answers under load stop after 2 tokens), ``fail`` (every POST answers HTTP 503),
``fail_after`` (POSTs after the first ``fail_after_n`` answer 503).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FLIP_STEP = 3


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # many concurrent connects (the default backlog of 5 resets some)


class FakeServer:
    def __init__(self, delay: float = 0.15):
        self.behaviour = "ok"
        self.delay = delay
        self.fail_after_n = 0
        self.posts = 0
        self.in_flight = 0
        self.lock = threading.Lock()
        self.httpd = _Server(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> "FakeServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # ------------------------------------------------------------------ answers

    def answer(self, body: dict, chat: bool, loaded: bool) -> dict:
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
            if loaded and t == FLIP_STEP and h % 2 == 0:
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

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real servers do

            def log_message(self, *args):  # keep test output clean
                pass

            def _send(self, code: int, obj) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Server", "fake-openai/1.0")
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                with server.lock:
                    server.posts += 1
                    n_post = server.posts
                    server.in_flight += 1
                    others_at_entry = server.in_flight > 1
                try:
                    if server.behaviour == "fail" or (server.behaviour == "fail_after"
                                                      and n_post > server.fail_after_n):
                        self._send(503, {"error": "overloaded"})
                        return
                    time.sleep(server.delay)
                    with server.lock:  # another request overlapped this one: it ran under load
                        loaded = others_at_entry or server.posts > n_post
                    if self.path == "/v1/chat/completions":
                        self._send(200, server.answer(body, True, loaded))
                    elif self.path == "/v1/completions":
                        self._send(200, server.answer(body, False, loaded))
                    else:
                        self._send(404, {"error": "not found"})
                finally:
                    with server.lock:
                        server.in_flight -= 1

        return Handler


if __name__ == "__main__":  # a standalone fake server, e.g. for benchmarks/bench_endpoint.py --fake
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--delay", type=float, default=0.0)
    args = ap.parse_args()
    srv = FakeServer(delay=args.delay)
    print(srv.url, flush=True)
    srv.httpd.serve_forever()
