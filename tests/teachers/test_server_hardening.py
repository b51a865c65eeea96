"""serve-teacher against hostile input: a table of malformed requests (each a JSON 4xx naming its error and
field), a bounded fuzz of a real server process on 127.0.0.1 (no 5xx, /health answers throughout, bounded
memory), quiet client disconnects, a busy port, and no socket beyond loopback."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from opd_megatron.teachers.process import spawn_teacher_server, stop_teacher_server
from tests.multirank import run_ranks
from tests.teachers.test_server import _make_checkpoint

REPO = Path(__file__).resolve().parents[2]
MAX_BODY = 20_000
GOOD = {"model": "tiny", "prompt": [[1, 10, 11, 12]], "max_tokens": 0, "echo": True, "prompt_logprobs": 3}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher_ckpt")
    return run_ranks(_make_checkpoint, 1, timeout=240, args=(str(root),))[0][0]


@pytest.fixture(scope="module")
def served(checkpoint):
    """(process, host, port, log lines) of a real server on 127.0.0.1."""
    proc, url = spawn_teacher_server(
        checkpoint, "--name", "tiny", "--max-k", "8", "--max-body-bytes", str(MAX_BODY),
        "--max-tokens-per-request", "100", "--max-wait-ms", "1",
        env={"OMP_NUM_THREADS": "1"}, timeout_s=120, cwd=REPO,
    )  # fmt: skip
    host, port = url.removeprefix("http://").rsplit(":", 1)
    try:
        yield proc, host, int(port)
    finally:
        stop_teacher_server(proc, 15)


def _exchange(port: int, data: bytes, timeout: float = 15.0) -> bytes:
    """Send raw bytes, half-close, read the whole answer (the server closes after an error)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        # The server may answer and close before it has read everything (a request line too long): then
        # sending fails, and its answer is still there to read.
        with contextlib.suppress(OSError):
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def _request(method: str, path: str, body: bytes = b"", headers: dict | None = None) -> bytes:
    head = {
        "Host": "127.0.0.1",
        "Connection": "close",
        **({"Content-Length": str(len(body))} if body or method == "POST" else {}),
    }
    head.update(headers or {})
    lines = "".join(f"{k}: {v}\r\n" for k, v in head.items())
    return f"{method} {path} HTTP/1.1\r\n{lines}\r\n".encode() + body


def _parse(answer: bytes) -> tuple[int, dict, bytes]:
    """(status, headers, body) of the first response in ``answer``."""
    head, _, rest = answer.partition(b"\r\n\r\n")
    lines = head.decode("iso-8859-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    n = int(headers.get("content-length", len(rest)))
    return status, headers, rest[:n]


def _json_error(answer: bytes) -> tuple[int, dict]:
    status, headers, body = _parse(answer)
    assert headers.get("content-type") == "application/json", answer[:300]
    return status, json.loads(body)["error"]


def _body(**over) -> bytes:
    return json.dumps({**GOOD, **over}).encode()


# (case, raw request, status, error type, param, words in the message)
REQUESTS = [
    ("5000-digit prompt_logprobs", _request("POST", "/v1/completions", b'{"prompt_logprobs": ' + b"9" * 5000 + b"}"),
     400, "invalid_request_error", None, "5000 digits"),
    ("21-digit token id", _request("POST", "/v1/completions", _body(prompt=[[1, 10**20]])),
     400, "invalid_request_error", None, "21 digits"),
    ("prompt nested 100,000 deep", _request("POST", "/v1/completions",
     b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"), 413, "invalid_request_error", None, "exceeds the limit"),
    ("prompt nested 5,000 deep", _request("POST", "/v1/completions", b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
     400, "invalid_request_error", None, "nests deeper than 16"),
    ("prompt nested 17 deep", _request("POST", "/v1/completions", _body(prompt=json.loads("[" * 17 + "]" * 17))),
     400, "invalid_request_error", None, "nests deeper than 16"),
    ("prompt nested 3 deep", _request("POST", "/v1/completions", _body(prompt=[[[1, 2]]])),
     400, "invalid_request_error", "prompt", "position 0: token id [1, 2] is not an integer"),
    ("PUT", _request("PUT", "/v1/completions", _body()), 405, "invalid_request_error", None, "method 'PUT'"),
    ("DELETE", _request("DELETE", "/health"), 405, "invalid_request_error", None, "method 'DELETE'"),
    ("made-up method", _request("FROB", "/health"), 405, "invalid_request_error", None, "method 'FROB'"),
    ("garbage request line", b"\x00\xff\x13 garbage\r\n\r\n", 400, "invalid_request_error", None, "Bad HTTP/0.9"),
    ("four-word request line", b"GET / HTTP/1.1 extra\r\n\r\n", 400, "invalid_request_error", None, "Bad request"),
    ("bad version", b"GET /health HTTQ/1.1\r\n\r\n", 400, "invalid_request_error", None, "Bad request version"),
    ("HTTP/2.0 line", b"GET /health HTTP/2.0\r\n\r\n", 400, "invalid_request_error", None, "Invalid HTTP version"),
    ("HTTP/0.9 line", b"GET /health\r\n\r\n", 400, "invalid_request_error", None, "HTTP/0.9"),
    ("request line too long", b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 414, "invalid_request_error", None, "URI Too Long"),
    ("header line too long", b"GET /health HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", 431, "invalid_request_error", None, "Line too long"),
    ("too many headers", b"GET /health HTTP/1.1\r\n" + b"X: 1\r\n" * 200 + b"\r\n", 431, "invalid_request_error", None, "Too many headers"),
    ("Content-Length with underscores", _request("POST", "/v1/completions", b"", {"Content-Length": "1_0"}),
     400, "invalid_request_error", None, "bad Content-Length"),
    ("Content-Length of 5000 digits", _request("POST", "/v1/completions", b"", {"Content-Length": "9" * 5000}),
     400, "invalid_request_error", None, "bad Content-Length"),
    ("negative Content-Length", _request("POST", "/v1/completions", b"", {"Content-Length": "-1"}),
     400, "invalid_request_error", None, "bad Content-Length"),
    ("no Content-Length", b"POST /v1/completions HTTP/1.1\r\nConnection: close\r\n\r\n",
     411, "invalid_request_error", None, "Content-Length header is required"),
    ("chunked body", _request("POST", "/v1/completions", b"", {"Transfer-Encoding": "chunked"}),
     411, "invalid_request_error", None, "chunked"),
    ("body too large", _request("POST", "/v1/completions", b"x" * (MAX_BODY + 1)), 413, "invalid_request_error", None, "exceeds the limit"),
    ("not JSON", _request("POST", "/v1/completions", b"{not json"), 400, "invalid_request_error", None, "not valid JSON"),
    ("invalid UTF-8", _request("POST", "/v1/completions", b'{"model": "\xff"}'), 400, "invalid_request_error", None, "not valid JSON"),
    ("body an array", _request("POST", "/v1/completions", b"[1, 2]"), 400, "invalid_request_error", None, "must be a JSON object, got list"),
    ("body a string", _request("POST", "/v1/completions", b'"x"'), 400, "invalid_request_error", None, "got str"),
    ("prompt_logprobs a string", _request("POST", "/v1/completions", _body(prompt_logprobs="3")),
     400, "invalid_request_error", "prompt_logprobs", "must be an integer"),
    ("prompt_logprobs a float", _request("POST", "/v1/completions", _body(prompt_logprobs=3.0)),
     400, "invalid_request_error", "prompt_logprobs", "must be an integer"),
    ("prompt_logprobs true", _request("POST", "/v1/completions", _body(prompt_logprobs=True)),
     400, "invalid_request_error", "prompt_logprobs", "must be an integer"),
    ("prompt_logprobs NaN", _request("POST", "/v1/completions", b'{"max_tokens": 0, "prompt_logprobs": NaN}'),
     400, "invalid_request_error", "prompt_logprobs", "must be an integer"),
    ("prompt_logprobs negative", _request("POST", "/v1/completions", _body(prompt_logprobs=-1)),
     400, "invalid_request_error", "prompt_logprobs", ">= 0"),
    ("prompt_logprobs too large", _request("POST", "/v1/completions", _body(prompt_logprobs=9)),
     400, "invalid_request_error", "prompt_logprobs", "max allowed: 8"),
    ("max_tokens missing", _request("POST", "/v1/completions", json.dumps({"prompt": [[1, 2]], "prompt_logprobs": 1}).encode()),
     400, "invalid_request_error", "max_tokens", "max_tokens: 0"),
    ("max_tokens false", _request("POST", "/v1/completions", _body(max_tokens=False)), 400, "invalid_request_error", "max_tokens", "got False"),
    ("max_tokens 5", _request("POST", "/v1/completions", _body(max_tokens=5)), 400, "invalid_request_error", "max_tokens", "got 5"),
    ("temperature 0.5", _request("POST", "/v1/completions", _body(temperature=0.5)), 400, "invalid_request_error", "temperature", "temperature=0.5"),
    ("stream", _request("POST", "/v1/completions", _body(stream=True)), 400, "invalid_request_error", "stream", "stream"),
    ("other model", _request("POST", "/v1/completions", _body(model="x" * 10_000)), 404, "NotFoundError", "model", "..."),
    ("text prompt", _request("POST", "/v1/completions", _body(prompt="hello")), 400, "invalid_request_error", "prompt", "text prompts"),
    ("empty prompt list", _request("POST", "/v1/completions", _body(prompt=[])), 400, "invalid_request_error", "prompt", "non-empty"),
    ("empty prompt", _request("POST", "/v1/completions", _body(prompt=[[]])), 400, "invalid_request_error", "prompt", "prompt 0 has 0 tokens"),
    ("token id a string", _request("POST", "/v1/completions", _body(prompt=[[1, "2"]])), 400, "invalid_request_error", "prompt", "position 1: token id '2'"),
    ("token id a float", _request("POST", "/v1/completions", _body(prompt=[[1, 2.0]])), 400, "invalid_request_error", "prompt", "token id 2.0"),
    ("token id null", _request("POST", "/v1/completions", _body(prompt=[[1, None]])), 400, "invalid_request_error", "prompt", "token id None"),
    ("token id beyond vocabulary", _request("POST", "/v1/completions", _body(prompt=[[1, 64]])), 400, "invalid_request_error", "prompt", "[0, 64)"),
    ("too many tokens", _request("POST", "/v1/completions", _body(prompt=[[1] * 40] * 3)), 400, "invalid_request_error", "prompt", "at most 100"),
    ("prompt past the context", _request("POST", "/v1/completions", _body(prompt=[[1] * 49])), 400, "invalid_request_error", "prompt", "49 tokens"),
    ("unknown GET route", _request("GET", "/admin"), 404, "NotFoundError", None, "no route GET /admin"),
    ("unknown POST route", _request("POST", "/v1/chat/completions", _body()), 404, "NotFoundError", None, "no route POST"),
    ("HEAD", _request("HEAD", "/health"), 405, None, None, None),
]  # fmt: skip


@pytest.mark.parametrize("case,raw,status,kind,param,words", REQUESTS, ids=[r[0] for r in REQUESTS])
def test_malformed_requests_get_a_json_4xx_naming_the_error(served, case, raw, status, kind, param, words):
    _, _, port = served
    answer = _exchange(port, raw)
    if kind is None:  # HEAD: status and headers, no body
        got, headers, body = _parse(answer)
        assert got == status and headers["content-type"] == "application/json" and body == b""
        return
    got, error = _json_error(answer)
    assert (got, error["code"], error["type"], error["param"]) == (status, status, kind, param), error
    assert words in error["message"], error
    assert len(error["message"]) <= 400
    ok, _, body = _parse(_exchange(port, _request("POST", "/v1/completions", _body())))
    assert ok == 200 and len(json.loads(body)["choices"]) == 1  # still serving


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _random_json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(10 if depth < 4 else 6)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.choice([0, 1, -1, 3, 63, 64, 2**31, -(2**63), 10**19, rng.randrange(-1000, 1000)])
    if kind == 2:
        return rng.choice([0.0, -0.0, 1.5, 1e308, -1e-308, float("nan"), float("inf")])
    if kind == 3:
        return "".join(chr(rng.randrange(1, 0x2FFF)) for _ in range(rng.randrange(8)))
    if kind in (4, 5):
        return rng.randrange(64)
    if kind in (6, 7):
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(5))]
    keys = ["model", "prompt", "max_tokens", "echo", "prompt_logprobs", "temperature", "stream", "x"]
    return {rng.choice(keys): _random_json(rng, depth + 1) for _ in range(rng.randrange(5))}


def _mutated_request_body(rng: random.Random) -> bytes:
    body = dict(GOOD)
    for _ in range(rng.randrange(1, 3)):
        key = rng.choice([*GOOD, "temperature", "stream"])
        if rng.random() < 0.2:
            body.pop(key, None)
        else:
            body[key] = _random_json(rng)
    if rng.random() < 0.3:  # a near-valid prompt: random ids, some out of range
        body["prompt"] = [
            [rng.randrange(-2, 70) for _ in range(rng.randrange(0, 6))] for _ in range(rng.randrange(0, 3))
        ]
    return json.dumps(body).encode()


def _random_bytes(rng: random.Random, n: int) -> bytes:
    return bytes(rng.randrange(256) for _ in range(n))


def _fuzz_request(rng: random.Random) -> bytes:
    kind = rng.randrange(6)
    if kind == 0:  # a random JSON value as the body
        return _request("POST", "/v1/completions", json.dumps(_random_json(rng)).encode())
    if kind == 1:  # a mutation of a valid request
        return _request("POST", "/v1/completions", _mutated_request_body(rng))
    if kind == 2:  # random bytes as the body
        return _request("POST", "/v1/completions", _random_bytes(rng, rng.randrange(1, 200)))
    if kind == 3:  # random bytes as the whole request
        return _random_bytes(rng, rng.randrange(1, 200))
    if kind == 4:  # random bytes after a plausible start: a broken request line or headers
        return (
            rng.choice([b"GET /", b"POST /v1/completions HTTP/1.1\r\n", b"GET /health HTTP/1.1\r\nA"])
            + _random_bytes(rng, rng.randrange(1, 100))
            + b"\r\n\r\n"
        )
    method = rng.choice(
        ["GET", "POST", "PUT", "PATCH", "OPTIONS", "TRACE", "CONNECT", "X" * rng.randrange(1, 30)]
    )
    path = rng.choice(["/health", "/v1/models", "/v1/completions", "/", "//x", "/%00", "*"])
    return _request(method, path, _random_bytes(rng, rng.randrange(0, 50)) if rng.random() < 0.5 else b"")  # fmt: skip


@pytest.mark.timeout(300)
def test_fuzz_no_5xx_health_answers_memory_bounded(served):
    proc, _, port = served
    rng = random.Random(20261128)
    n_requests, answered, statuses = 2400, 0, {}
    for _ in range(200):  # warm up: allocator arenas, caches, the model's first passes
        _exchange(port, _request("POST", "/v1/completions", _mutated_request_body(rng)))
    rss_start = _rss_kib(proc.pid)
    t0 = time.monotonic()
    for i in range(n_requests):
        raw = _fuzz_request(rng)
        answer = _exchange(port, raw)
        if answer:  # a blank request line is closed without an answer, as HTTP allows
            status, headers, body = _parse(answer)
            statuses[status] = statuses.get(status, 0) + 1
            assert status < 500, (raw[:200], answer[:400])
            if status >= 400 and not raw.startswith(b"HEAD "):
                assert headers.get("content-type") == "application/json", (raw[:200], answer[:400])
                assert "message" in json.loads(body)["error"]
            answered += 1
        if i % 100 == 0:
            status, _, body = _parse(_exchange(port, _request("GET", "/health")))
            assert status == 200 and json.loads(body)["status"] == "ok"
        assert proc.poll() is None, "the server died"
        assert time.monotonic() - t0 < 240, f"fuzzing took too long ({i} requests)"
    rss_end = _rss_kib(proc.pid)
    print(f"fuzz: {n_requests} requests in {time.monotonic() - t0:.1f}s, statuses {sorted(statuses.items())}, "
          f"RSS {rss_start // 1024} -> {rss_end // 1024} MiB")  # fmt: skip
    assert answered >= 0.9 * n_requests and statuses.get(200, 0) > 0
    assert rss_end - rss_start < 64 * 1024, f"server RSS grew from {rss_start} KiB to {rss_end} KiB"


def _start_logged(checkpoint: str, log: Path) -> tuple[subprocess.Popen, int]:
    """A server whose output goes to ``log`` (to read what it printed); returns it and its port."""
    cmd = [sys.executable, "-m", "opd_megatron.cli", "serve-teacher", checkpoint, "--port", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        for line in log.read_text().splitlines():
            if line.startswith("serving teacher "):
                return proc, int(line.rsplit(":", 1)[1])
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"server did not start:\n{log.read_text()[-3000:]}")


def test_client_disconnects_are_one_quiet_line(checkpoint, tmp_path):
    log = tmp_path / "server.log"
    proc, port = _start_logged(checkpoint, log)
    try:
        for _ in range(5):  # hang up (RST) before the answer is written
            s = socket.create_connection(("127.0.0.1", port))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            s.sendall(_request("POST", "/v1/completions", _body(model=None)))
            s.close()
        s = socket.create_connection(("127.0.0.1", port))  # the body never fully arrives
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
        s.close()
        deadline = time.monotonic() + 30
        while log.read_text().count("went away") < 6 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _parse(_exchange(port, _request("GET", "/health")))[0] == 200
    finally:
        stop_teacher_server(proc, 15)
    text = log.read_text()
    gone = [line for line in text.splitlines() if "went away" in line]
    assert len(gone) == 6, text[-3000:]
    assert all(line.startswith("client 127.0.0.1:") for line in gone)
    assert "Traceback" not in text and "BrokenPipe" not in text.replace("(BrokenPipeError)", ""), text[-3000:]


def test_busy_port_is_a_one_line_error(checkpoint):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "opd_megatron.cli", "serve-teacher", checkpoint, "--port", str(port)],
            cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert f"config error: --port: 127.0.0.1:{port} is already in use" in out.stderr
    assert "Traceback" not in out.stderr


def _listening_addresses(pid: int) -> list[str]:
    """Local addresses of the TCP sockets ``pid`` listens on, as hex from /proc/net."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                found.append(fields[1].split(":")[0])
    return found


LOOPBACK_HEX = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1, ::1


def test_nothing_listens_beyond_loopback(served):
    proc, _, _ = served
    addresses = _listening_addresses(proc.pid)
    assert addresses, "the server should at least listen for HTTP"
    assert set(addresses) <= LOOPBACK_HEX, addresses


def test_a_server_started_with_stop_signals_blocked_still_stops_on_sigterm(checkpoint, tmp_path):
    # A trainer with a PreemptionHandler blocks SIGTERM/SIGINT, and children inherit the mask across exec.
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        proc, _ = _start_logged(checkpoint, tmp_path / "server.log")
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    try:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "teacher server stopped" in (tmp_path / "server.log").read_text()
