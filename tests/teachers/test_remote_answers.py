"""Malformed teacher answers: each one is a TeacherError that names the teacher and what is wrong, never a
TypeError/KeyError. The table runs through a real HTTP round trip against a server that sends fixed bytes."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from opd_megatron.teachers import RemoteTeacher, RemoteTeacherClient, TeacherError
from opd_megatron.teachers.remote import MalformedAnswer, parse_prompt_logprobs

SEQS = [[1, 5, 6], [1, 7]]
K = 2


def _good() -> dict:
    def pos(own, others):
        d = {str(own): {"logprob": -0.25, "rank": 1, "decoded_token": "a"}}
        d.update(
            {
                str(t): {"logprob": -2.0 - r, "rank": r + 2, "decoded_token": None}
                for r, t in enumerate(others)
            }
        )
        return d

    return {
        "choices": [
            {"index": 0, "prompt_logprobs": [None, pos(5, [9, 10]), pos(6, [11])]},
            {"index": 1, "prompt_logprobs": [None, pos(7, [3])]},
        ]
    }


def _set(path, value):
    """An answer with the value at ``path`` (keys and list indices) replaced."""

    def make():
        a = _good()
        node = a
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        return a

    return make


def _del(path):
    def make():
        a = _good()
        node = a
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
        return a

    return make


P0 = ("choices", 0, "prompt_logprobs", 1)  # prompt 0, position 1

# (case, answer maker, words the TeacherError must contain)
ANSWERS = [
    ("logprob null", _set((*P0, "5", "logprob"), None), "prompt 0, position 1, token 5: logprob must be a number"),
    ("logprob NaN", _set((*P0, "5", "logprob"), float("nan")), "token 5: logprob must be a finite number"),
    ("logprob inf", _set((*P0, "9", "logprob"), float("inf")), "token 9: logprob must be a finite number"),
    ("logprob -inf", _set((*P0, "9", "logprob"), float("-inf")), "token 9: logprob must be a finite number"),
    ("logprob positive", _set((*P0, "9", "logprob"), 3.0), "token 9: logprob must be a finite number <= 0"),
    ("logprob string", _set((*P0, "9", "logprob"), "-1"), "token 9: logprob must be a number"),
    ("logprob bool", _set((*P0, "9", "logprob"), True), "token 9: logprob must be a number"),
    ("logprob missing", _del((*P0, "9", "logprob")), "token 9: missing 'logprob'"),
    ("entry not an object", _set((*P0, "9"), -1.0), "token 9: missing 'logprob'"),
    ("position not an object", _set(P0, [1, 2]), "prompt 0, position 1: expected an object"),
    ("position null", _set(P0, None), "prompt 0, position 1: expected an object"),
    ("too few candidates", _set(P0, {"5": {"logprob": -0.1}}), "prompt 0, position 1: expected the top 2"),
    ("own token missing", _del((*P0, "5")), "expected the top 2 tokens and token 5"),
    ("non-decimal id", _set((*P0, "1e5"), {"logprob": -1.0}), "token id '1e5' is not a decimal integer"),
    ("negative id", _set((*P0, "-3"), {"logprob": -1.0}), "token id '-3' is not a decimal integer"),
    ("huge id", _set((*P0, "9" * 30), {"logprob": -1.0}), "is not a decimal integer"),
    ("id beyond the vocabulary", _set((*P0, "64"), {"logprob": -1.0}), "token id '64' is not a decimal integer in [0, 64)"),
    ("too few positions", _set(("choices", 0, "prompt_logprobs"), [None, {}]), "prompt 0: prompt_logprobs must hold 3 entries, got 2"),
    ("too many positions", _set(("choices", 1, "prompt_logprobs"), [None, {}, {}]), "prompt 1: prompt_logprobs must hold 2 entries, got 3"),
    ("prompt_logprobs missing", _del(("choices", 1, "prompt_logprobs")), "prompt 1: prompt_logprobs must hold 2 entries, got None"),
    ("prompt_logprobs a string", _set(("choices", 1, "prompt_logprobs"), "x"), "prompt 1: prompt_logprobs must hold 2 entries"),
    ("too few choices", _set(("choices",), [{"index": 0}]), "expected 2 choices, got 1"),
    ("choices missing", _del(("choices",)), "no 'choices' list"),
    ("choices an object", _set(("choices",), {"0": 1}), "no 'choices' list"),
    ("choice not an object", _set(("choices", 1), 7), "choice 1 is not an object"),
    ("index out of range", _set(("choices", 1, "index"), 5), "choice 1: index must be an integer in [0, 2)"),
    ("index a string", _set(("choices", 1, "index"), "1"), "choice 1: index must be an integer"),
    ("index twice", _set(("choices", 1, "index"), 0), "choice 1: index 0 appears twice"),
    ("answer a list", lambda: [1, 2], "no 'choices' list"),
    ("answer null", lambda: None, "no 'choices' list"),
]  # fmt: skip


@pytest.mark.parametrize("case,make,words", ANSWERS, ids=[a[0] for a in ANSWERS])
def test_malformed_answers_are_teacher_errors(answer_server, case, make, words):
    answer_server.body = json.dumps(make()).encode()  # Python writes NaN/Infinity, as a broken server might
    client = RemoteTeacherClient(answer_server.url, "maths", retries=0, timeout_s=5, model="m", vocab_size=64)
    with pytest.raises(TeacherError) as err:
        client.score_topk(SEQS, K)
    message = str(err.value)
    assert message.startswith(f"teacher 'maths' at {answer_server.url}: malformed answer: ")
    assert words in message


# Bodies that are not the JSON asked for, and bodies cut short on the wire.
RAW = [
    ("not JSON", b"<html>oops</html>", None, "answer is not JSON"),
    ("empty body", b"", None, "answer is not JSON"),
    ("truncated JSON", json.dumps(_good()).encode()[:40], None, "answer is not JSON"),
    ("5000-digit integer", b'{"choices": ' + b"9" * 5000 + b"}", None, "answer is not JSON (ValueError"),
    ("deep nesting", b"[" * 100_000 + b"]" * 100_000, None, "answer is not JSON (RecursionError"),
    ("invalid UTF-8", b'{"choices": "\xff\xfe"}', None, "answer is not JSON"),
    ("connection closed mid-body", json.dumps(_good()).encode(), 30, "no answer after 1 attempts"),
]  # fmt: skip


@pytest.mark.parametrize("case,body,cut,words", RAW, ids=[r[0] for r in RAW])
def test_unreadable_answers_are_teacher_errors(answer_server, case, body, cut, words):
    answer_server.body, answer_server.cut = body, cut
    client = RemoteTeacherClient(answer_server.url, "maths", retries=0, timeout_s=5, model="m")
    with pytest.raises(TeacherError, match=r"^teacher 'maths' at http://127\.0\.0\.1:\d+: ") as err:
        client.score_topk(SEQS, K)
    assert words in str(err.value)


def test_a_well_formed_answer_parses_and_a_remote_teacher_raises_teacher_error_on_a_bad_one(answer_server):
    got = parse_prompt_logprobs(_good(), SEQS, K, vocab_size=64)
    assert got[0].topk_ids_LK.tolist() == [[5, 9], [6, 11]] and got[1].topk_ids_LK.tolist() == [[7, 3]]
    assert got[0].token_logprobs_L.tolist() == [-0.25, -0.25]
    with pytest.raises(MalformedAnswer, match="prompt 0, position 2: expected the top 3"):
        parse_prompt_logprobs(_good(), SEQS, 3)
    # Through the Teacher interface, what the orchestrator sees is a TeacherError (an aborted step).
    answer_server.body = json.dumps(_set((*P0, "5", "logprob"), None)()).encode()
    client = RemoteTeacherClient(answer_server.url, "maths", retries=0, timeout_s=5, model="m")
    teacher = RemoteTeacher(client, k=K)
    with pytest.raises(TeacherError, match="logprob must be a number"):
        teacher.score([None, None], [[1], [1]], [[5, 6], [7]])


def test_models_listing_without_a_name_is_a_teacher_error(answer_server):
    answer_server.body = json.dumps({"data": [{"id": None}]}).encode()
    client = RemoteTeacherClient(answer_server.url, "maths", retries=0, timeout_s=5)
    with pytest.raises(TeacherError, match="/v1/models answer lists no model"):
        client.model_name()


class _Fixed(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def _answer(self):
        srv = self.server
        n = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(n)
        body = srv.body
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))  # the full length, also when cut short
        self.end_headers()
        self.wfile.write(body if srv.cut is None else body[: srv.cut])
        if srv.cut is not None:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True

    do_GET = do_POST = _answer


@pytest.fixture
def answer_server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Fixed)
    srv.daemon_threads = True
    srv.body, srv.cut = b"{}", None
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
