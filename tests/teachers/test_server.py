"""The teacher scoring service: a real server process on 127.0.0.1 against in-process scoring of the same
checkpoint, its vLLM response format, bad requests, and the client's retries when the server is down,
slow or failing."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from opd_megatron.teachers import RemoteTeacher, RemoteTeacherClient, TeacherError, TopKTargets
from opd_megatron.teachers.process import spawn_teacher_server, stop_teacher_server
from tests.multirank import run_ranks
from tests.teachers.stub import stub_server as _stub

TOKEN = "s3cret-token"
MAX_K = 8
MAX_BODY = 20_000
SEQS = [[1, 10, 11, 12, 13, 14], [1, 20, 21], [1, 30, 31, 32, 33, 34, 35, 36, 37], [1, 5]]


def _make_checkpoint(rank, root):
    """A tiny random teacher (character vocabulary, 64 ids) and its in-process top-k scores of SEQS."""
    from opd_megatron.config import ModelConfig, ParallelConfig, RunConfig
    from opd_megatron.distributed import init_distributed
    from opd_megatron.models.checkpoint import save_checkpoint
    from opd_megatron.models.gpt import build_gpt_model
    from opd_megatron.teachers.topk_scoring import TopKScorer
    from opd_megatron.tokenization import CharTokenizer

    groups = init_distributed(ParallelConfig())
    tok = CharTokenizer()
    cfg = RunConfig(
        name="tiny-teacher",
        model=ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, max_sequence_length=48),
    )
    model = build_gpt_model(cfg.model, groups, tok.vocab_size, seed=7, frozen=True)
    ckpt = save_checkpoint(root, 0, model, groups, config=cfg, tokenizer=tok)
    scores = TopKScorer(model, groups, pad_id=tok.pad_id).score(SEQS, MAX_K)
    return str(ckpt), [tuple(s) for s in scores]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher_ckpt")
    return run_ranks(_make_checkpoint, 1, timeout=240, args=(str(root),))[0]


def _start_server(ckpt: str, *extra: str) -> tuple[subprocess.Popen, str]:
    return spawn_teacher_server(
        ckpt, "--name", "tiny", "--max-k", str(MAX_K), "--max-body-bytes", str(MAX_BODY), "--max-wait-ms", "20",
        "--max-tokens-per-request", "100", *extra,
        env={"OMP_NUM_THREADS": "1"}, timeout_s=120, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip


@pytest.fixture(scope="module")
def server(checkpoint):
    proc, url = _start_server(checkpoint[0], "--token", TOKEN)
    try:
        yield url
    finally:  # always stop the process, also when a test failed
        stop_teacher_server(proc, 15)


def _client(url, **kw) -> RemoteTeacherClient:
    return RemoteTeacherClient(url, "tiny", token=TOKEN, timeout_s=30, retries=1, backoff_s=0.05, **kw)


def _post(url: str, body, token: str | None = TOKEN, raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(f"{url}/v1/completions", data=data, method="POST")
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _body(prompt=None, k=3, **over) -> dict:
    return {"model": "tiny", "prompt": prompt or [SEQS[0]], "max_tokens": 0, "echo": True,
            "prompt_logprobs": k, **over}  # fmt: skip


def _assert_matches(got, ref, k):
    ids, values, token_lp, _ = ref
    assert torch.equal(got.topk_ids_LK, ids[:, :k])
    torch.testing.assert_close(got.topk_logprobs_LK, values[:, :k], atol=1e-5, rtol=0)
    torch.testing.assert_close(got.token_logprobs_L, token_lp, atol=1e-5, rtol=0)


def test_remote_scores_equal_in_process_scores(server, checkpoint):
    ref = checkpoint[1]
    client = _client(server)
    assert client.health()
    assert client.model_name() == "tiny"
    got = client.score_topk(SEQS, 5)
    assert len(got) == len(SEQS)
    for g, r, s in zip(got, ref, SEQS):
        assert g.topk_ids_LK.shape == (len(s) - 1, 5)
        _assert_matches(g, r, 5)
    # Concurrent requests (batched together by the server's worker) get their own answers.
    results: dict[int, list] = {}

    def one(i):
        results[i] = _client(server).score_topk([SEQS[i % len(SEQS)]], MAX_K - i % 3)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for i in range(8):
        _assert_matches(results[i][0], ref[i % len(SEQS)], MAX_K - i % 3)


def test_response_follows_vllm_prompt_logprobs(server, checkpoint):
    status, out = _post(server, _body([SEQS[1]], k=2))
    assert status == 200, out
    (choice,) = out["choices"]
    plp = choice["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(SEQS[1])
    ref_ids = checkpoint[1][1][0]
    for pos in range(1, len(SEQS[1])):
        entries = plp[pos]
        assert str(SEQS[1][pos]) in entries  # the prompt's own token is always there
        top = {int(t): e for t, e in entries.items() if e["rank"] <= 2}
        assert sorted(top) == sorted(ref_ids[pos - 1, :2].tolist())
        assert all(set(e) == {"logprob", "rank", "decoded_token"} for e in entries.values())
        assert all(isinstance(e["decoded_token"], str) for e in entries.values())
    assert out["usage"]["prompt_tokens"] == len(SEQS[1])


@pytest.mark.parametrize(
    "body,token,status,words",
    [
        (_body([[1, 2, 999]]), TOKEN, 400, "token id 999"),
        (_body([[1, 2, -1]]), TOKEN, 400, "token id -1"),
        (_body(k=MAX_K + 1), TOKEN, 400, "prompt_logprobs"),
        (_body(), None, 401, "bearer token"),
        (_body(), "wrong-token", 401, "bearer token"),
        (_body(max_tokens=5), TOKEN, 400, "max_tokens"),
        (_body([[1] * 49]), TOKEN, 400, "49 tokens"),
        (_body([[1] * 40] * 3), TOKEN, 400, "at most 100"),
        (_body(model="other"), TOKEN, 404, "other"),
        (_body(prompt="text"), TOKEN, 400, "prompt"),
    ],
)
def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, body, token, status, words):
    got, out = _post(server, body, token=token)
    assert got == status, out
    assert out["error"]["code"] == status and words in out["error"]["message"]
    assert _post(server, _body())[0] == 200


def test_oversized_and_malformed_bodies(server):
    got, out = _post(server, None, raw=b"x" * (MAX_BODY + 1))
    assert got == 413 and "exceeds the limit" in out["error"]["message"]
    got, out = _post(server, None, raw=b"{not json")
    assert got == 400 and "not valid JSON" in out["error"]["message"]
    # The client surfaces a 4xx at once (no retry), naming the teacher.
    client = _client(server)
    with pytest.raises(TeacherError, match="'tiny'.*HTTP 400.*token id 70"):
        client.score_topk([[1, 70]], 2)
    assert client.attempts == 2  # model discovery + the refused request
    assert _client(server).health()


def test_remote_teacher_targets_feed_the_topk_loss(server, checkpoint):
    from opd_megatron.losses.topk import topk_distillation_loss

    teacher = RemoteTeacher(_client(server), k=4)
    prompts = [s[:3] for s in SEQS[:3]]
    completions = [s[3:] for s in SEQS[:3]]  # the second row has an empty completion
    targets = teacher.score([None] * 3, prompts, completions)
    assert isinstance(targets, TopKTargets) and targets.finite()
    ref = checkpoint[1]
    want_ids = torch.cat([ref[i][0][2 : 2 + len(c), :4] for i, c in enumerate(completions)])
    assert targets.topk_ids_NK.shape == (sum(map(len, completions)), 4)
    assert torch.equal(targets.topk_ids_NK, want_ids)
    student_logits = torch.randn(targets.topk_ids_NK.shape[0], 64, requires_grad=True)
    out = topk_distillation_loss(student_logits, targets.topk_logprobs_NK, targets.topk_ids_NK)
    out.loss.backward()
    assert torch.isfinite(out.loss) and student_logits.grad is not None


# -- client reliability against stub servers (no model) ------------------------------------------------


def test_client_retries_then_names_the_teacher_when_down():
    srv, _ = _stub("ok")
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()  # nothing listens there any more
    client = RemoteTeacherClient(url, "maths-expert", timeout_s=1, retries=2, backoff_s=0.05, model="m")
    t0 = time.monotonic()
    with pytest.raises(
        TeacherError, match=r"teacher 'maths-expert' at http://127\.0\.0\.1:\d+: no answer after 3"
    ):
        client.score_topk([[1, 2, 3]], 1)
    assert client.attempts == 3
    # Two backoffs (0.05 s, then 0.1 s), each scaled by a jitter factor of at least 0.75.
    assert time.monotonic() - t0 >= 0.75 * (0.05 + 0.1)
    assert not client.health()


def test_client_times_out_and_retries_a_slow_server():
    srv, handler = _stub("slow")
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        client = RemoteTeacherClient(url, "slow-teacher", timeout_s=0.2, retries=1, backoff_s=0.01, model="m")
        with pytest.raises(TeacherError, match="'slow-teacher'.*no answer after 2.*(timed out|Timeout)"):
            client.score_topk([[1, 2, 3]], 1)
        deadline = time.monotonic() + 5  # on a loaded machine the stub may log the last hit late
        while handler.hits < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert handler.hits == 2
    finally:
        srv.shutdown()
        srv.server_close()


def test_client_retries_a_503_and_then_succeeds():
    srv, handler = _stub("flaky")
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
        client = RemoteTeacherClient(url, "flaky", timeout_s=5, retries=3, backoff_s=0.01, model="m")
        (got,) = client.score_topk([[1, 2, 3]], 1)
        assert handler.hits == 3 and client.attempts == 3
        assert got.topk_ids_LK.tolist() == [[2], [3]] and got.token_logprobs_L.tolist() == [-0.5, -0.5]
    finally:
        srv.shutdown()
        srv.server_close()


def test_serving_beyond_loopback_needs_a_token(monkeypatch, capsys):
    from opd_megatron.cli import main

    monkeypatch.delenv("OPD_TEACHER_TOKEN", raising=False)
    assert main(["serve-teacher", "no-such-checkpoint", "--host", "0.0.0.0"]) == 2
    assert "--host" in capsys.readouterr().err
