"""Client of a teacher scoring service: this project's ``serve-teacher`` or a real ``vllm serve``.

The request is vLLM's prompt-scoring form of the completions API: token-id prompts, ``max_tokens: 0``
with ``echo: true`` (vLLM then scores the prompt without generating) and ``prompt_logprobs: k``. A
matching vLLM server::

    vllm serve /path/to/hf-teacher --served-model-name expert --max-logprobs 20 \\
        --host 127.0.0.1 --port 8000 --api-key "$TEACHER_TOKEN"

(``--max-logprobs`` must be >= the k the student asks for; vLLM computes prompt log-probs from the raw
logits, so they are at temperature 1. The teacher's tokenizer must be the student's: this client sends
token ids.)

Reliability: one keep-alive connection per calling thread; every attempt has a socket timeout; connection
failures, timeouts and 408/429/5xx answers are retried with exponential backoff and jitter; other 4xx
answers are the caller's mistake and fail at once. Every failure is a :class:`TeacherError` that names
the teacher and its URL.
"""

from __future__ import annotations

import http.client
import json
import math
import random
import re
import reprlib
import threading
import time
import urllib.parse
from typing import NamedTuple

import torch
import torch.distributed as dist

from opd_megatron.teachers.base import Teacher, TeacherError, TopKTargets

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class PromptTopK(NamedTuple):
    """Teacher scores of one sequence of ``L`` tokens: ``L - 1`` rows, row ``j`` for token ``j + 1``
    (the first token has no prediction)."""

    topk_ids_LK: torch.Tensor
    """``[L - 1, k]`` long: the teacher's k most likely tokens, most likely first."""
    topk_logprobs_LK: torch.Tensor
    """``[L - 1, k]`` fp32: their log-probs."""
    token_logprobs_L: torch.Tensor
    """``[L - 1]`` fp32: log-prob of the token actually in the sequence."""


class RemoteTeacherClient:
    """Scores token sequences on a remote teacher; thread-safe (one connection per thread)."""

    def __init__(
        self,
        url: str,
        name: str,
        token: str | None = None,
        timeout_s: float = 60.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        *,
        model: str | None = None,
        max_backoff_s: float = 10.0,
        max_prompts_per_request: int = 64,
        vocab_size: int | None = None,
    ):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"teacher {name!r}: url must look like http://host:port, got {url!r}")
        self.url, self.name, self.token = url, name, token
        self.timeout_s, self.retries, self.backoff_s, self.max_backoff_s = (
            timeout_s,
            retries,
            backoff_s,
            max_backoff_s,
        )
        self.model = model
        self.max_prompts_per_request = max_prompts_per_request
        self.vocab_size = vocab_size
        """When given, answers naming a token id outside ``[0, vocab_size)`` are malformed."""
        self._scheme, self._host, self._port = parts.scheme, parts.hostname, parts.port
        # Accept the base URL with or without vLLM's /v1 suffix.
        self._prefix = parts.path.rstrip("/").removesuffix("/v1")
        self._local = threading.local()
        self.attempts = 0
        """Requests sent, retries included (for tests and metrics)."""

    # transport ----------------------------------------------------------------------------------
    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
            conn = cls(self._host, self._port, timeout=self.timeout_s)
            self._local.conn = conn
        return conn

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def close(self) -> None:
        """Close this thread's connection (others close when their threads end)."""
        self._drop_connection()

    def _fail(self, message: str) -> TeacherError:
        return TeacherError(f"teacher {self.name!r} at {self.url}: {message}")

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        """One JSON call with retries; returns the decoded answer or raises :class:`TeacherError`."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        last = "no attempt made"
        for attempt in range(self.retries + 1):
            if attempt:
                # Exponential backoff with jitter, so many ranks retrying at once do not arrive together.
                delay = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
                time.sleep(delay * random.uniform(0.75, 1.25))
            self.attempts += 1
            try:
                conn = self._connection()
                conn.request(method, self._prefix + path, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
                status = resp.status
                if resp.will_close:
                    self._drop_connection()
            except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, half-closed
                self._drop_connection()
                last = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                continue
            if status == 200:
                try:
                    return json.loads(raw)
                # ValueError: also integers past Python's digit limit; RecursionError: absurd nesting.
                except (ValueError, RecursionError) as e:
                    raise self._fail(f"answer is not JSON ({type(e).__name__}: {str(e)[:200]})") from None
            message = _error_message(raw)
            if status in RETRY_STATUSES:
                last = f"HTTP {status}: {message}"
                continue
            raise self._fail(f"HTTP {status}: {message}")
        raise self._fail(
            f"no answer after {self.retries + 1} attempts (timeout {self.timeout_s}s each); last error: {last}"
        )

    # API ----------------------------------------------------------------------------------------
    def health(self) -> bool:
        """True when the server answers ``/health`` with 200 (one attempt, no retry)."""
        try:
            conn = self._connection()
            conn.request("GET", self._prefix + "/health")
            resp = conn.getresponse()
            resp.read()
            return resp.status == 200
        except (OSError, http.client.HTTPException):
            self._drop_connection()
            return False

    def model_name(self) -> str:
        """The served model name (asked once from ``/v1/models`` unless given)."""
        if self.model is None:
            answer = self._request("GET", "/v1/models")
            try:
                model = answer["data"][0]["id"]
            except (KeyError, IndexError, TypeError):
                model = None
            if not isinstance(model, str) or not model:
                raise self._fail(f"/v1/models answer lists no model: {_short(answer, 200)}")
            self.model = model
        return self.model

    def score_topk(self, seqs: list[list[int]], k: int) -> list[PromptTopK]:
        """The teacher's top-``k`` log-probs at every position of every sequence (see :class:`PromptTopK`)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        out: list[PromptTopK] = []
        for a in range(0, len(seqs), self.max_prompts_per_request):
            chunk = [list(map(int, s)) for s in seqs[a : a + self.max_prompts_per_request]]
            body = {
                "model": self.model_name(),
                "prompt": chunk,
                "max_tokens": 0,
                "echo": True,
                "prompt_logprobs": k,
            }
            out += self._parse(chunk, k, self._request("POST", "/v1/completions", body))
        return out

    def _parse(self, seqs: list[list[int]], k: int, answer) -> list[PromptTopK]:
        try:
            return parse_prompt_logprobs(answer, seqs, k, self.vocab_size)
        except MalformedAnswer as e:
            raise self._fail(f"malformed answer: {e}") from None


class MalformedAnswer(ValueError):
    """An answer that does not hold what the request asked for; the message says where and what."""


_TOKEN_KEY_RE = re.compile(r"[0-9]{1,18}")  # decimal token ids, bounded (no '1e5', '+1', '1_0', '²')


def _logprob(value, where: str) -> float:
    # bool is an int in Python, and a teacher answering `true` is broken, not certain.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MalformedAnswer(f"{where}: logprob must be a number, got {_short(value)}")
    value = float(value)
    if not math.isfinite(value) or value > _MAX_LOGPROB:
        raise MalformedAnswer(f"{where}: logprob must be a finite number <= 0, got {value}")
    return value


_MAX_LOGPROB = 1e-4
"""Rounding in a teacher's log-softmax can give a certain token a log-prob a hair above 0."""


def _short(value, limit: int = 80) -> str:
    return reprlib.repr(value)[:limit]


def parse_prompt_logprobs(
    answer, seqs: list[list[int]], k: int, vocab_size: int | None = None
) -> list[PromptTopK]:
    """Decode vLLM's ``prompt_logprobs`` answer for ``seqs`` into one :class:`PromptTopK` each.

    Checks everything the loss relies on and raises :class:`MalformedAnswer` naming the prompt, the
    position and the field otherwise: one choice per prompt (each ``index`` once), one entry per prompt
    position, at least ``k`` candidates plus the prompt's own token at every position, token ids that are
    decimal integers (below ``vocab_size`` when given), finite log-probs ``<= 0``.
    """
    choices = answer.get("choices") if isinstance(answer, dict) else None
    if not isinstance(choices, list):
        raise MalformedAnswer(f"no 'choices' list in the answer (got {_short(answer)})")
    if len(choices) != len(seqs):
        raise MalformedAnswer(f"expected {len(seqs)} choices, got {len(choices)}")
    by_index: dict[int, dict] = {}
    for n, choice in enumerate(choices):
        if not isinstance(choice, dict):
            raise MalformedAnswer(f"choice {n} is not an object (got {_short(choice)})")
        index = choice.get("index", n)
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(seqs):
            raise MalformedAnswer(
                f"choice {n}: index must be an integer in [0, {len(seqs)}), got {_short(index)}"
            )
        if index in by_index:
            raise MalformedAnswer(f"choice {n}: index {index} appears twice")
        by_index[index] = choice
    out = []
    for i, seq in enumerate(seqs):
        plp = by_index[i].get("prompt_logprobs")
        if not isinstance(plp, list) or len(plp) != len(seq):
            got = f"{len(plp)} entries" if isinstance(plp, list) else _short(plp)
            raise MalformedAnswer(f"prompt {i}: prompt_logprobs must hold {len(seq)} entries, got {got}")
        ids_LK, values_LK, token_lp_L = [], [], []
        for pos in range(1, len(seq)):
            where = f"prompt {i}, position {pos}"
            entries = plp[pos]
            if not isinstance(entries, dict):
                raise MalformedAnswer(f"{where}: expected an object of candidates, got {_short(entries)}")
            ranked = []
            for key, entry in entries.items():
                if not _TOKEN_KEY_RE.fullmatch(key) or (vocab_size is not None and int(key) >= vocab_size):
                    bound = f" in [0, {vocab_size})" if vocab_size is not None else ""
                    raise MalformedAnswer(f"{where}: token id {_short(key)} is not a decimal integer{bound}")
                if not isinstance(entry, dict) or "logprob" not in entry:
                    raise MalformedAnswer(f"{where}, token {key}: missing 'logprob' (got {_short(entry)})")
                ranked.append((_logprob(entry["logprob"], f"{where}, token {key}"), int(key)))
            own = str(seq[pos])
            if len(ranked) < k or own not in entries:
                raise MalformedAnswer(
                    f"{where}: expected the top {k} tokens and token {seq[pos]}, got {len(ranked)} entries "
                    f"(is the server's --max-logprobs >= {k}?)"
                )
            # Sorted by log-prob, not by dict order: the prompt's own token may come first (vLLM) and is
            # only part of the top-k when it ranks there.
            ranked.sort(key=lambda x: -x[0])
            ids_LK.append([t for _, t in ranked[:k]])
            values_LK.append([lp for lp, _ in ranked[:k]])
            token_lp_L.append(float(entries[own]["logprob"]))
        out.append(
            PromptTopK(
                torch.tensor(ids_LK, dtype=torch.long).reshape(-1, k),
                torch.tensor(values_LK, dtype=torch.float32).reshape(-1, k),
                torch.tensor(token_lp_L, dtype=torch.float32),
            )
        )
    return out


def _error_message(raw: bytes) -> str:
    """The message of an OpenAI-style error body, else the start of the body."""
    try:
        err = json.loads(raw)
        if isinstance(err, dict):
            inner = err.get("error", err)
            for where in (inner, err):
                if isinstance(where, dict) and "message" in where:
                    message = where["message"]
                    return message[:300] if isinstance(message, str) else _short(message, 300)
    except (ValueError, RecursionError):
        pass
    return raw[:300].decode(errors="replace") or "(empty body)"


class RemoteTeacher(Teacher):
    """A teacher behind a scoring service: returns its top-k over each completion token (sparse targets
    for :func:`~opd_megatron.losses.topk.topk_distillation_loss`).

    With ``groups``, only TP rank 0 of the last pipeline stage calls the service and broadcasts the
    answer to its TP peers (they hold the same rollouts); other stages return ``None``, as for a
    co-located teacher. Data-parallel ranks each score their own rollouts.
    """

    dense = False

    def __init__(self, client: RemoteTeacherClient, k: int, groups=None):
        self.name, self.client, self.k, self.groups = client.name, client, k, groups
        self.calls = 0
        self.tokens_scored = 0

    def score(self, rows, prompt_ids, completion_ids) -> TopKTargets | None:
        g = self.groups
        if g is not None and not g.is_last_stage:
            return None
        if g is None or g.tp_size == 1:
            targets = self._fetch(prompt_ids, completion_ids)
        else:
            # Broadcast a failure too: a TP peer waiting for an answer that never comes would hang.
            payload: list = [None]
            if g.tp_rank == 0:
                try:
                    payload[0] = self._fetch(prompt_ids, completion_ids)
                except TeacherError as e:
                    payload[0] = e
            dist.broadcast_object_list(payload, src=dist.get_global_rank(g.tp_group, 0), group=g.tp_group)
            targets = payload[0]
            if isinstance(targets, TeacherError):
                raise targets
        self.calls += 1
        self.tokens_scored += targets.topk_ids_NK.shape[0]
        return targets

    def _fetch(self, prompt_ids, completion_ids) -> TopKTargets:
        # Rows without completion tokens contribute no position: not worth a request.
        keep = [i for i, c in enumerate(completion_ids) if c]
        if any(not prompt_ids[i] for i in keep):
            raise TeacherError(
                f"teacher {self.name!r}: a row has an empty prompt; its first token cannot be scored"
            )
        scores = self.client.score_topk([list(prompt_ids[i]) + list(completion_ids[i]) for i in keep], self.k)
        ids, values, token_lp = [], [], []
        for i, sc in zip(keep, scores):
            # Row j of the scores is token j + 1: completion token c sits at len(prompt) + c.
            start, n = len(prompt_ids[i]) - 1, len(completion_ids[i])
            ids.append(sc.topk_ids_LK[start : start + n])
            values.append(sc.topk_logprobs_LK[start : start + n])
            token_lp.append(sc.token_logprobs_L[start : start + n])
        if not keep:
            return TopKTargets(
                torch.zeros(0, self.k, dtype=torch.long), torch.zeros(0, self.k), torch.zeros(0)
            )
        device = self.groups.device if self.groups is not None else "cpu"
        return TopKTargets(
            torch.cat(ids).to(device), torch.cat(values).to(device), torch.cat(token_lp).to(device)
        )
