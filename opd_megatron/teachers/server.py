"""HTTP teacher scoring service: the part of vLLM's OpenAI-compatible completions API that OPD uses.

Endpoints:

- ``GET /health``: ``200 {"status": "ok", ...}`` with counters; no token needed (it reveals nothing).
- ``GET /v1/models``: the served model name, as vLLM lists it.
- ``POST /v1/completions`` with ``{"model": NAME, "prompt": [[ids...], ...], "max_tokens": 0,
  "echo": true, "prompt_logprobs": k}``. Each choice carries vLLM's ``prompt_logprobs``: one entry per
  prompt position, ``None`` for the first, else ``{"<token_id>": {"logprob": float, "rank": int,
  "decoded_token": str | None}}`` holding the top-k tokens (ranks 1..k) and the prompt's own token with
  its vocabulary rank (k or k + 1 entries). ``-inf`` log-probs are sent as ``-9999.0``, like vLLM.

The same request works against ``vllm serve <hf-model-dir> --max-logprobs K`` (see ``docs`` in the
``serve-teacher`` help): vLLM scores prompts without generating when ``echo`` is true and ``max_tokens``
is 0, and computes prompt log-probs from the raw logits (temperature 1).

Concurrency: a threaded HTTP front end parses and validates each request, then hands it to one
:class:`BatchingWorker` thread, which groups whatever requests arrive within ``max_wait_s`` (up to
``max_batch`` sequences) into a single forward pass. The model runs at TP=1 in this process. Serving a
TP-split model would run the server under torchrun with rank 0 speaking HTTP and broadcasting each batch
to the other ranks before the forward; that is not implemented.

Security: binds 127.0.0.1 unless told otherwise, and so does everything else in the process: its
one-process ``torch.distributed`` group uses an in-memory store (a TCP store would listen on every
interface) and gloo bound to the loopback interface. Optional bearer token compared in constant time.
The body size, the integers in it (digits), its nesting depth, the tokens per request and k are
bounded. Every malformed request, down to a garbage request line or an unsupported method, gets a 4xx
JSON error ``{"error": {"message", "type", "code"}}`` and the server keeps serving; only a failure of
the model itself is a 500. Slow clients time out; a client that hangs up costs one log line.
"""

from __future__ import annotations

import hmac
import json
import math
import os
import queue
import re
import reprlib
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from opd_megatron.teachers.topk_scoring import PromptScores

NEG_INF_LOGPROB = -9999.0
"""What vLLM sends for a -inf log-prob (JSON has no infinity)."""

MAX_INT_DIGITS = 20
"""Longest integer literal accepted in a request body (token ids and k need far fewer digits; without a
bound, converting a huge literal is quadratic and Python refuses past 4300 digits)."""

MAX_JSON_DEPTH = 16
"""Deepest nesting of arrays/objects accepted in a request body (a request needs 3)."""

_CONTENT_LENGTH_RE = re.compile(r"[0-9]{1,15}")


@dataclass
class ServerLimits:
    """Bounds on what one request may ask for, and on the batches the worker forms."""

    max_k: int = 20
    """Largest ``prompt_logprobs`` accepted (vLLM's ``--max-logprobs``, default 20)."""
    max_body_bytes: int = 8 << 20
    max_tokens_per_request: int = 65536
    """Sum of prompt lengths in one request."""
    max_batch: int = 32
    """Sequences per forward pass."""
    max_wait_s: float = 0.005
    """How long the worker waits for more requests to join a batch."""
    socket_timeout_s: float = 60.0
    """A client that sends nothing for this long is disconnected."""


def _short(value, limit: int = 60) -> str:
    """A bounded repr for error messages: a client's value may be huge or deeply nested."""
    text = reprlib.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _bounded_int(literal: str) -> int:
    if len(literal.lstrip("-")) > MAX_INT_DIGITS:
        raise RequestError(
            400, f"an integer in the body has {len(literal)} digits; at most {MAX_INT_DIGITS} allowed"
        )
    return int(literal)


def _json_depth_exceeds(value, limit: int) -> bool:
    """Whether arrays/objects nest deeper than ``limit`` (iterative: no recursion on hostile input)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node
        for child in children:
            if isinstance(child, list | dict):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


def parse_json_body(raw: bytes):
    """Decode a request body, bounded: integer literals of at most :data:`MAX_INT_DIGITS` digits and
    nesting of at most :data:`MAX_JSON_DEPTH` levels; raises :class:`RequestError` (400) otherwise."""
    try:
        value = json.loads(raw, parse_int=_bounded_int)
    except RecursionError:  # json's scanner recurses per level: a body of 100,000 '[' ends here
        raise RequestError(400, f"the body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise RequestError(400, f"the body is not valid JSON: {str(e)[:200]}") from None
    if isinstance(value, list | dict) and _json_depth_exceeds(value, MAX_JSON_DEPTH):
        raise RequestError(400, f"the body nests deeper than {MAX_JSON_DEPTH} levels")
    return value


class RequestError(Exception):
    """A request the server refuses; becomes an HTTP 4xx with an OpenAI-style error body."""

    def __init__(
        self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def body(self) -> dict:
        """OpenAI's error object; ``param`` names the request field at fault (or ``None``)."""
        return {
            "error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}
        }


def parse_completion_request(
    body: dict, limits: ServerLimits, model_name: str, vocab_size: int, max_len: int
) -> tuple[list[list[int]], int]:
    """Validate a completions request; return (token-id prompts, k) or raise :class:`RequestError`."""
    if not isinstance(body, dict):
        raise RequestError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if model is not None and model != model_name:
        shown = model if isinstance(model, str) and len(model) <= 100 else _short(model)
        raise RequestError(
            404,
            f"The model `{shown}` does not exist; this server serves `{model_name}`",
            "NotFoundError",
            "model",
        )
    if body.get("stream"):
        raise RequestError(400, "stream is not supported by this scoring server", param="stream")
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, bool) or max_tokens != 0:
        raise RequestError(
            400,
            f"this server only scores prompts: send max_tokens: 0 (got {_short(max_tokens)})",
            param="max_tokens",
        )
    temperature = body.get("temperature", 1.0)
    if temperature not in (None, 1, 1.0):
        raise RequestError(
            400,
            f"prompt log-probs are computed at temperature 1, got temperature={_short(temperature)}",
            param="temperature",
        )
    k = body.get("prompt_logprobs")
    if isinstance(k, bool) or not isinstance(k, int):
        raise RequestError(
            400,
            f"prompt_logprobs must be an integer (the k of top-k), got {_short(k)}",
            param="prompt_logprobs",
        )
    if not 0 <= k <= min(limits.max_k, vocab_size):
        raise RequestError(
            400,
            f"Requested prompt_logprobs of {k}, which is greater than max allowed: "
            f"{min(limits.max_k, vocab_size)}"
            if k > 0
            else f"prompt_logprobs must be >= 0, got {k}",
            param="prompt_logprobs",
        )
    prompt = body.get("prompt")
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        prompt = [prompt]  # one prompt given as a flat list of ids
    if not isinstance(prompt, list) or not prompt or not all(isinstance(p, list) for p in prompt):
        raise RequestError(
            400,
            "prompt must be a non-empty list of token ids or a list of such lists (text prompts are not supported)",
            param="prompt",
        )
    total = sum(len(p) for p in prompt)
    if total > limits.max_tokens_per_request:
        raise RequestError(
            400,
            f"the request holds {total} prompt tokens; this server accepts at most {limits.max_tokens_per_request}",
            param="prompt",
        )
    for i, p in enumerate(prompt):
        if not 0 < len(p) <= max_len:
            raise RequestError(
                400,
                f"prompt {i} has {len(p)} tokens; allowed: 1 to {max_len} (the model's context)",
                param="prompt",
            )
        for j, t in enumerate(p):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
                raise RequestError(
                    400,
                    f"prompt {i}, position {j}: token id {_short(t)} is not an integer in [0, {vocab_size})",
                    param="prompt",
                )
    return prompt, k


def format_prompt_logprobs(seq: list[int], scores: PromptScores, decode: Callable[[int], str | None]) -> list:
    """vLLM's ``prompt_logprobs`` for one prompt: ``[None, {id: {logprob, rank, decoded_token}}, ...]``."""

    def plain(x: torch.Tensor) -> list:
        # -inf becomes vLLM's -9999.0; NaN passes through (JSON NaN): the client counts it as non-finite.
        return torch.where(x == -math.inf, NEG_INF_LOGPROB, x).tolist()

    ids, values = scores.topk_ids_LK.tolist(), plain(scores.topk_logprobs_LK)
    tok_lp, tok_rank = plain(scores.token_logprobs_L), scores.token_ranks_L.tolist()
    out: list = [None]
    # This loop builds (k + 1) dicts per position and dominates the server's non-model time: keep it flat.
    for j, token in enumerate(seq[1:]):
        position = {str(token): {"logprob": tok_lp[j], "rank": tok_rank[j], "decoded_token": decode(token)}}
        for r, (t, v) in enumerate(zip(ids[j], values[j]), 1):
            if t != token:  # the prompt's own token is listed once, first (as vLLM does)
                position[str(t)] = {"logprob": v, "rank": r, "decoded_token": decode(t)}
        out.append(position)
    return out


class _Job:
    __slots__ = ("seqs", "k", "done", "result", "error")

    def __init__(self, seqs: list[list[int]], k: int):
        self.seqs, self.k = seqs, k
        self.done = threading.Event()
        self.result: list[PromptScores] | None = None
        self.error: BaseException | None = None


class BatchingWorker:
    """One thread that owns the model: it merges concurrent requests into forward passes of at most
    ``max_batch`` sequences, waiting at most ``max_wait_s`` for company after the first request."""

    def __init__(
        self,
        score_fn: Callable[[list[list[int]], int], list[PromptScores]],
        max_batch: int,
        max_wait_s: float,
    ):
        self.score_fn, self.max_batch, self.max_wait_s = score_fn, max_batch, max_wait_s
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._carry: _Job | None = None
        self._thread = threading.Thread(target=self._run, name="teacher-batching", daemon=True)
        self.stats = {"requests": 0, "forward_passes": 0, "sequences": 0, "tokens": 0, "busy_s": 0.0}

    def start(self) -> BatchingWorker:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def submit(self, seqs: list[list[int]], k: int) -> list[PromptScores]:
        """Score ``seqs`` (blocking); raises what the model raised."""
        job = _Job(seqs, k)
        self._queue.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def _collect(self) -> list[_Job] | None:
        first = self._carry or self._queue.get()
        self._carry = None
        if first is None:
            return None
        jobs, n = [first], len(first.seqs)
        deadline = time.monotonic() + self.max_wait_s
        while n < self.max_batch:
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:  # stop after this batch
                self._queue.put(None)
                break
            if n + len(job.seqs) > self.max_batch:
                self._carry = job  # it starts the next batch instead of overfilling this one
                break
            jobs.append(job)
            n += len(job.seqs)
        return jobs

    def _run(self) -> None:
        while (jobs := self._collect()) is not None:
            seqs = [s for j in jobs for s in j.seqs]
            k = max(j.k for j in jobs)
            t0 = time.perf_counter()
            try:
                scores: list[PromptScores] = []
                for a in range(0, len(seqs), self.max_batch):  # one oversized request: several passes
                    scores += self.score_fn(seqs[a : a + self.max_batch], k)
                    self.stats["forward_passes"] += 1
            except BaseException as e:  # every waiting request learns of the failure
                for j in jobs:
                    j.error = e
                    j.done.set()
                continue
            finally:
                self.stats["busy_s"] += time.perf_counter() - t0
            self.stats["requests"] += len(jobs)
            self.stats["sequences"] += len(seqs)
            self.stats["tokens"] += sum(len(s) for s in seqs)
            i = 0
            for j in jobs:
                j.result = [sc.truncate(j.k) for sc in scores[i : i + len(j.seqs)]]
                i += len(j.seqs)
                j.done.set()


class TeacherHTTPServer(ThreadingHTTPServer):
    """The HTTP front end; request handlers read the teacher state from here."""

    daemon_threads = True
    # Many OPD ranks may connect at once; the default backlog of 5 refuses connections under load.
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        worker: BatchingWorker,
        *,
        model_name: str,
        vocab_size: int,
        max_len: int,
        limits: ServerLimits,
        token: str | None = None,
        decode: Callable[[int], str | None] = lambda _: None,
        log_requests: bool = False,
    ):
        super().__init__(address, _Handler)
        self.worker, self.model_name, self.vocab_size, self.max_len = worker, model_name, vocab_size, max_len
        self.limits, self.token, self.decode, self.log_requests = limits, token, decode, log_requests
        self.started = time.time()

    def handle_error(self, request, client_address) -> None:
        """A client that hung up or stalled is routine: one line, no traceback. Anything else is a bug in
        this server: the standard report (with traceback), and the server keeps serving."""
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError):
            host, port = client_address[:2]
            # One write per line: handler threads log concurrently, and print() writes the text and
            # the newline separately, so two lines could interleave.
            sys.stderr.write(f"client {host}:{port} went away ({type(exc).__name__})\n")
            sys.stderr.flush()
            return
        super().handle_error(request, client_address)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def start_in_thread(self) -> threading.Thread:
        """Serve from a daemon thread (tests, benchmarks); ``shutdown()`` stops it."""
        t = threading.Thread(target=self.serve_forever, name="teacher-http", daemon=True)
        t.start()
        return t


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse their connection
    server_version = "opd-megatron-teacher/1"
    server: TeacherHTTPServer

    def setup(self) -> None:
        self.timeout = self.server.limits.socket_timeout_s
        super().setup()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        if self.server.log_requests:
            super().log_message(format, *args)

    # responses ----------------------------------------------------------------------------------
    def _send_json(self, status: int, obj, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(obj, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        if status == 401:
            self.send_header("WWW-Authenticate", 'Bearer realm="teacher"')
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _send_error(self, e: RequestError, headers: dict[str, str] | None = None) -> None:
        self._send_json(e.status, e.body(), headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The base class's error page, as this API's JSON error (it calls this for request lines,
        headers and methods it cannot handle). A method without a handler is 405, not 501: the request
        is at fault, not the server; an unsupported HTTP version is a bad request too."""
        if self.request_version == "HTTP/0.9":  # no status line or headers in 0.9: answer as 1.0
            self.request_version = "HTTP/1.0"
        self.close_connection = True  # after a malformed request line or header, the stream is suspect
        headers = None
        if code == HTTPStatus.NOT_IMPLEMENTED:
            code, headers = HTTPStatus.METHOD_NOT_ALLOWED, {"Allow": "GET, POST"}
            message = f"method {_short(self.command, 40)} is not supported; use GET or POST"
        elif code >= 500:
            code = HTTPStatus.BAD_REQUEST
        text = message or HTTPStatus(code).phrase
        if explain and explain != text:
            text = f"{text}: {explain}"
        self._send_error(RequestError(int(code), text[:300]), headers)

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        if self.request_version == "HTTP/0.9":  # "GET /path" with no version: no headers to answer with
            self.send_error(HTTPStatus.BAD_REQUEST, "HTTP/0.9 requests are not supported")
            return False
        return True

    # checks -------------------------------------------------------------------------------------
    def _check_auth(self) -> None:
        token = self.server.token
        if not token:
            return
        given = self.headers.get("Authorization", "")
        # Constant-time comparison: response timing must not reveal how much of a guess was right.
        if not hmac.compare_digest(given.encode(errors="replace"), f"Bearer {token}".encode()):
            raise RequestError(401, "missing or wrong bearer token (send 'Authorization: Bearer <token>')",
                               "authentication_error")  # fmt: skip

    def _read_json(self):
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked" or length is None:
            raise RequestError(411, "a Content-Length header is required (chunked bodies are not accepted)")
        if not _CONTENT_LENGTH_RE.fullmatch(length.strip()):
            raise RequestError(400, f"bad Content-Length {_short(length)} (expected a byte count)")
        n = int(length)
        if n > self.server.limits.max_body_bytes:
            raise RequestError(
                413, f"request body of {n} bytes exceeds the limit of {self.server.limits.max_body_bytes}"
            )
        try:
            raw = self.rfile.read(n)
        except TimeoutError:
            raise RequestError(408, f"the body did not arrive within {self.timeout} s") from None
        if len(raw) < n:  # the client closed its side early: nothing to parse, nobody to answer
            raise ConnectionResetError(f"the body ended after {len(raw)} of {n} bytes")
        self._body_read = True
        return parse_json_body(raw)

    # routes -------------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        try:
            if self.path == "/health":
                stats = dict(self.server.worker.stats, uptime_s=round(time.time() - self.server.started, 1))
                self._send_json(200, {"status": "ok", "model": self.server.model_name, "stats": stats})
            elif self.path == "/v1/models":
                self._check_auth()
                model = {"id": self.server.model_name, "object": "model", "owned_by": "opd-megatron",
                         "max_model_len": self.server.max_len}  # fmt: skip
                self._send_json(200, {"object": "list", "data": [model]})
            else:
                raise RequestError(404, f"no route GET {self.path[:100]}", "NotFoundError")
        except RequestError as e:
            self._send_error(e)

    def do_POST(self) -> None:  # noqa: N802
        self._body_read = False
        try:
            if self.path not in ("/v1/completions", "/v1/completions/"):
                raise RequestError(
                    404,
                    f"no route POST {self.path[:100]}; this server answers /v1/completions",
                    "NotFoundError",
                )
            self._check_auth()
            body = self._read_json()
            s = self.server
            seqs, k = parse_completion_request(body, s.limits, s.model_name, s.vocab_size, s.max_len)
        except RequestError as e:
            if not self._body_read:  # unread body bytes would be taken for the next request
                self.close_connection = True
            self._send_error(e)
            return
        try:
            scores = s.worker.submit(seqs, k)
        except Exception as e:  # the model failed on valid input: a server fault (500); it stays up
            self._send_json(
                500,
                {"error": {"message": f"scoring failed: {str(e)[:300]}", "type": "internal_error",
                           "param": None, "code": 500}},
            )  # fmt: skip
            return
        # Writing the answer may fail if the client left meanwhile; handle_error logs that in one line.
        self._send_json(200, self._response(seqs, scores))

    def _response(self, seqs: list[list[int]], scores: list[PromptScores]) -> dict:
        decode = self.server.decode
        choices = []
        for i, (seq, sc) in enumerate(zip(seqs, scores)):
            text = "".join(d or "" for d in map(decode, seq))
            choices.append(
                {
                    "index": i,
                    "text": text,
                    "logprobs": None,
                    "finish_reason": "length",
                    "prompt_logprobs": format_prompt_logprobs(seq, sc, decode),
                    "prompt_token_ids": seq,
                }
            )
        n = sum(len(s) for s in seqs)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.server.model_name,
            "choices": choices,
            "usage": {"prompt_tokens": n, "completion_tokens": 0, "total_tokens": n},
        }


def make_decoder(tokenizer) -> Callable[[int], str | None]:
    """``decoded_token`` for each id (special tokens by name), cached; ``None`` without a tokenizer."""
    if tokenizer is None:
        return lambda _: None
    cache: dict[int, str] = {}

    def decode(token_id: int) -> str:
        if token_id not in cache:
            cache[token_id] = tokenizer.decode([token_id], skip_special=False)
        return cache[token_id]

    return decode


def loopback_interface() -> str | None:
    """The name of the loopback network interface (``lo`` on Linux), or ``None`` if none is found."""
    for name in sorted(os.listdir("/sys/class/net")) if os.path.isdir("/sys/class/net") else []:
        try:
            flags = int(open(f"/sys/class/net/{name}/flags").read().strip(), 16)  # noqa: SIM115
        except (OSError, ValueError):
            continue
        if flags & 0x8:  # IFF_LOOPBACK
            return name
    return None


def init_local_process_group() -> None:
    """torch.distributed for this one process, reachable from this process only.

    ``init_process_group``'s default TCP store listens on every interface (whatever ``MASTER_ADDR`` says:
    that is only where clients connect). One rank needs no rendezvous, so an in-memory store does; gloo
    (and NCCL's bootstrap) still open sockets for their groups, so they are pinned to the loopback
    interface unless the caller chose one."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    lo = loopback_interface()
    if lo is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", lo)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", lo)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)


def check_port_free(host: str, port: int) -> None:
    """Raise ``OSError`` now if ``host:port`` cannot be bound, before minutes of model loading."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the HTTP server binds
        probe.bind((host, port))


def build_teacher_server(
    checkpoint: str,
    *,
    name: str | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | None = None,
    limits: ServerLimits | None = None,
    dtype: str = "fp32",
    log_requests: bool = False,
    convert_cache: str = "runs/hf_cache",
    verify_checksums: bool = True,
) -> TeacherHTTPServer:
    """Load a checkpoint of this project, or a Hugging Face model directory (converted once into
    ``convert_cache``, reused after), into a one-process (TP=1) model and bind the HTTP server to it
    (``port=0``: a free port; read it from ``server.url``). Call ``serve_forever`` or ``start_in_thread``;
    the worker thread is already running. A port that cannot be bound raises ``OSError`` before the
    model loads. The checkpoint's files are checked against its manifest first: sizes, and with
    ``verify_checksums`` their SHA-256 too."""
    from pathlib import Path

    from opd_megatron.config import ParallelConfig
    from opd_megatron.distributed import init_distributed
    from opd_megatron.models.checkpoint import load_model_weights, read_config, read_meta, resolve_checkpoint
    from opd_megatron.models.gpt import build_gpt_model
    from opd_megatron.models.hf_dir import is_hf_dir, materialise
    from opd_megatron.teachers.topk_scoring import TopKScorer
    from opd_megatron.tokenization import load_tokenizer

    limits = limits or ServerLimits()
    check_port_free(host, port)
    init_local_process_group()
    groups = init_distributed(ParallelConfig())  # one process, TP=1: gloo on CPU, nccl on a GPU
    tokenizer = None
    if is_hf_dir(checkpoint):
        hf = materialise(checkpoint, groups, convert_cache, where="checkpoint")
        checkpoint, tokenizer = str(hf.checkpoint), load_tokenizer(hf.tokenizer)
    ckpt = resolve_checkpoint(checkpoint, checksums=verify_checksums)
    cfg = read_config(ckpt)
    if (Path(ckpt) / "tokenizer").is_dir():
        tokenizer = load_tokenizer(ckpt / "tokenizer")
    vocab = read_meta(ckpt).get("real_vocab_size") or (tokenizer.vocab_size if tokenizer else None)
    model = build_gpt_model(cfg.model, groups, vocab, frozen=True, params_dtype=dtype, initialize=False)
    load_model_weights(ckpt, model)
    pad_id = tokenizer.pad_id if tokenizer is not None else 0
    scorer = TopKScorer(model, groups, pad_id=pad_id)
    worker = BatchingWorker(scorer.score, limits.max_batch, limits.max_wait_s).start()
    return TeacherHTTPServer(
        (host, port),
        worker,
        model_name=name or cfg.name,
        vocab_size=scorer.vocab_size,
        max_len=scorer.max_sequence_length,
        limits=limits,
        token=token,
        decode=make_decoder(tokenizer),
        log_requests=log_requests,
    )


__all__ = [
    "BatchingWorker",
    "build_teacher_server",
    "init_local_process_group",
    "parse_json_body",
    "RequestError",
    "ServerLimits",
    "TeacherHTTPServer",
    "format_prompt_logprobs",
    "make_decoder",
    "parse_completion_request",
]
