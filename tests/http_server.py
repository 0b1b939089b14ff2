"""The HTTP side of the test servers (tests/fake_openai_server.py, tests/model_server.py): a threaded
server on 127.0.0.1 that counts the requests in flight, so that an answer can tell whether it ran
while another request was being served (what a batching server does under load), and how many were
in flight at most while it ran (``peak[n_post]``). A request leaves the count before its answer is
written, so the next group a client sends never meets the last one's stragglers."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # many concurrent connects (the default backlog of 5 resets some)
    daemon_threads = True


class CompletionServer:
    """Subclasses answer: ``get(path)`` and ``post(path, body, loaded, n_post)`` return (status, JSON);
    ``instant(path, body)`` answers a POST at once, outside the load accounting (None: not such a
    route); ``refuse(n_post)`` may turn a POST down before it is served."""

    server_header = "test-server/1.0"

    def __init__(self, delay: float):
        self.delay = delay
        self.posts = 0
        self.in_flight = 0
        self.peak: dict[int, int] = {}  # the most requests in flight while each POST (by number) ran
        self.lock = threading.Lock()
        self.httpd = _Server(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def get(self, path: str) -> tuple[int, dict]:
        return 404, {"error": "not found"}

    def instant(self, path: str, body: dict) -> tuple[int, dict] | None:
        return None

    def refuse(self, n_post: int) -> tuple[int, dict] | None:
        return None

    def post(self, path: str, body: dict, loaded: bool, n_post: int) -> tuple[int, dict] | None:
        """(status, JSON), or None: close the connection without an answer."""
        raise NotImplementedError

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real servers do

            def log_message(self, *args):  # keep test output clean
                pass

            def _send(self, code: int, obj) -> None:  # a str goes as text (Prometheus metrics), the rest as JSON
                data = obj.encode() if isinstance(obj, str) else json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "text/plain" if isinstance(obj, str) else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Server", server.server_header)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(*server.get(self.path))

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                at_once = server.instant(self.path, body)
                if at_once is not None:
                    self._send(*at_once)
                    return
                with server.lock:
                    server.posts += 1
                    n_post = server.posts
                    server.in_flight += 1
                    others_at_entry = server.in_flight > 1
                    server.peak[n_post] = server.in_flight
                    for k in server.peak:
                        server.peak[k] = max(server.peak[k], server.in_flight)
                try:
                    reply = server.refuse(n_post)
                    if reply is None:
                        time.sleep(server.delay)
                        with server.lock:  # another request overlapped this one: it ran under load
                            loaded = others_at_entry or server.posts > n_post
                        reply = server.post(self.path, body, loaded, n_post)
                finally:
                    with server.lock:
                        server.in_flight -= 1
                        server.peak.pop(n_post, None)
                if reply is None:  # dropped: the connection closes with no answer
                    self.close_connection = True
                    return
                self._send(*reply)

        return Handler
