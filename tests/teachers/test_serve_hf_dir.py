"""``opd-megatron serve-teacher`` on a Hugging Face directory (a tiny Qwen3 built here): converted once into
its conversion cache, it answers ``/health`` and scoring requests on 127.0.0.1 with transformers' log-probs,
and a second start reuses the conversion; a broken directory is a one-line error (exit 2)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from opd_megatron.teachers import RemoteTeacherClient
from opd_megatron.teachers.process import RENDEZVOUS_VARS, spawn_teacher_server, stop_teacher_server
from tests.hf_model_dirs import break_hf_dir, tiny_qwen3_dir

ROOT = Path(__file__).resolve().parents[2]
SEQS = [[5, 17, 40, 41, 100, 3], [7, 8, 9]]
K = 4


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return tiny_qwen3_dir(tmp_path_factory.mktemp("serve_hf") / "qwen3", seed=3)


def _serve(hf_dir: Path, cache: Path):
    return spawn_teacher_server(
        hf_dir, "--name", "qwen", "--convert-cache", str(cache), "--max-k", str(K),
        env={"OMP_NUM_THREADS": "1"}, timeout_s=180, cwd=ROOT,
    )  # fmt: skip


def _conversions(cache: Path) -> dict[str, int]:
    return {str(m.relative_to(cache)): m.stat().st_mtime_ns for m in cache.glob("*/*/meta.json")}


def _reference(hf_dir: Path) -> list[torch.Tensor]:
    """transformers' next-token log-probs at every position after the first, per sequence."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return [torch.log_softmax(model(torch.tensor([s])).logits[0, :-1], -1) for s in SEQS]


def test_serves_an_hf_directory_converted_once(hf_dir, tmp_path):
    cache = tmp_path / "cache"
    ref = _reference(hf_dir)
    proc, url = _serve(hf_dir, cache)
    try:
        assert url.startswith("http://127.0.0.1:")
        client = RemoteTeacherClient(url, "qwen", timeout_s=60, retries=1, backoff_s=0.05)
        assert client.health() and client.model_name() == "qwen"
        got = client.score_topk(SEQS, K)
    finally:
        stop_teacher_server(proc, 15)
    first = _conversions(cache)
    assert len(first) == 1  # one conversion, under the directory's content hash
    for g, r, s in zip(got, ref, SEQS):
        values, ids = r.topk(K, dim=-1)
        assert torch.equal(g.topk_ids_LK, ids)
        torch.testing.assert_close(g.topk_logprobs_LK, values, atol=1e-4, rtol=0)
        own = r.gather(1, torch.tensor(s[1:])[:, None])[:, 0]  # each next token's own log-prob
        torch.testing.assert_close(g.token_logprobs_L, own, atol=1e-4, rtol=0)

    proc, url = _serve(hf_dir, cache)  # a second start: the cached conversion, not a new one
    try:
        client = RemoteTeacherClient(url, "qwen", timeout_s=60, retries=1, backoff_s=0.05)
        assert client.health()
        again = client.score_topk(SEQS[:1], K)[0]
    finally:
        stop_teacher_server(proc, 15)
    assert _conversions(cache) == first
    assert torch.equal(again.topk_ids_LK, got[0].topk_ids_LK)


@pytest.mark.parametrize(
    "how, needle",
    [
        ("architecture", "config.json: unsupported architecture ['GPT2LMHeadModel']"),
        ("tokenizer", "no tokenizer.json or tokenizer.model"),
        ("weights", "tensors required by config.json are missing: model.layers.2."),
    ],
)
def test_a_broken_hf_directory_is_one_line_exit_2(hf_dir, tmp_path, how, needle):
    bad = break_hf_dir(hf_dir, tmp_path / f"bad_{how}", how)
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARS}
    proc = subprocess.run(
        [sys.executable, "-m", "opd_megatron.cli", "serve-teacher", str(bad), "--port", "0",
         "--convert-cache", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=180, cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"config error: checkpoint: {bad}"), proc.stderr
    assert needle in proc.stderr
    assert "serving teacher" not in proc.stdout
    assert not (tmp_path / "cache").exists()
