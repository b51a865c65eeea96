"""A model-free stand-in for a teacher server: every token scores -0.5 and is its own top-1. Behaviours:
``ok``; ``slow`` (answers after 1 s); ``flaky`` (503 on the first two requests). ``hits`` counts requests."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Stub(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    behaviour = "ok"
    hits = 0

    def log_message(self, *a):
        pass

    def do_POST(self):  # noqa: N802
        cls = type(self)
        cls.hits += 1
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if cls.behaviour == "slow":
            time.sleep(1.0)
        if cls.behaviour == "flaky" and cls.hits <= 2:
            data = b'{"error": {"message": "overloaded", "type": "x", "code": 503}}'
            status = 503
        else:
            choices = []
            for i, seq in enumerate(body["prompt"]):
                plp = [None] + [
                    {str(t): {"logprob": -0.5, "rank": 1, "decoded_token": None}} for t in seq[1:]
                ]
                choices.append({"index": i, "prompt_logprobs": plp})
            data = json.dumps({"choices": choices}).encode()
            status = 200
        try:
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client gave up waiting
            pass


def stub_server(behaviour: str):
    handler = type("Stub", (_Stub,), {"behaviour": behaviour, "hits": 0})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, handler
