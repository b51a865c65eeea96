"""Choosing the rollout engine from the config, and the per-step call the training loop makes."""

from __future__ import annotations

import pytest

from opd_megatron.rollout.vllm_host import vllm_import_error
from tests.multirank import run_ranks

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"


def _job(rank: int, with_vllm: bool) -> dict:
    import torch

    from opd_megatron.config import ConfigError, ModelConfig, ParallelConfig, RunConfig, from_dict, to_dict
    from opd_megatron.distributed import init_distributed
    from opd_megatron.models.gpt import build_gpt_model
    from opd_megatron.rollout.engines import after_optimizer_step, build_sampler
    from opd_megatron.rollout.types import SamplingParams
    from opd_megatron.tokenization.char import CharTokenizer

    groups = init_distributed(ParallelConfig())
    tok = CharTokenizer(CHARS)
    model_cfg = ModelConfig(num_layers=1, hidden_size=128, num_attention_heads=4, max_sequence_length=48)
    model = build_gpt_model(model_cfg, groups, tok.vocab_size, seed=0)
    base = to_dict(RunConfig(model=model_cfg))
    out = {}
    megatron = build_sampler(RunConfig(model=model_cfg), model, groups, tok)
    out["megatron"] = (type(megatron).__name__, after_optimizer_step(megatron, model))
    no_lean = from_dict(RunConfig, {**base, "rollout": {"lean_decode": False}})
    out["lean"] = (megatron.lean_decode, build_sampler(no_lean, model, groups, tok).lean_decode)
    mixed = from_dict(RunConfig, {**base, "rollout": {"engine": "vllm"}, "loss": {"mix_alpha": 0.5}})
    try:
        build_sampler(mixed, model, groups, tok)
    except ConfigError as e:
        out["mixed"] = str(e)
    if with_vllm:
        cfg = from_dict(RunConfig, {**base, "rollout": {"engine": "vllm", "vllm_kv_cache_mb": 4}})
        engine = build_sampler(cfg, model, groups, tok)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.5)
        metrics = after_optimizer_step(engine, model)
        greedy = SamplingParams(max_new_tokens=6, temperature=0.0)
        prompts = [[5, 6, 7], [9]]
        out["vllm"] = (
            type(engine).__name__,
            metrics,
            engine.generate(prompts, greedy),
            megatron.generate(prompts, greedy),
        )
    return out


@pytest.fixture(scope="module")
def job():
    return run_ranks(_job, world_size=1, timeout=600, args=(vllm_import_error() is None,))[0]


def test_megatron_is_the_default_and_needs_no_refit(job):
    assert job["megatron"] == ("MegatronSampler", {})


def test_lean_decode_is_on_by_default_and_can_be_switched_off(job):
    assert job["lean"] == (True, False)


def test_vllm_refuses_teacher_mixed_sampling(job):
    assert job["mixed"].startswith("rollout.engine: vllm cannot sample from the teacher mixture")


@pytest.mark.skipif(vllm_import_error() is not None, reason=vllm_import_error() or "")
def test_vllm_engine_is_refitted_after_each_step(job):
    name, metrics, engine_ro, megatron_ro = job["vllm"]
    assert name == "VLLMEngine"
    assert set(metrics) >= {
        "rollout/refit_seconds",
        "rollout/refit_load_seconds",
        "rollout/refit_engine_rss_mb",
    }
    assert metrics["rollout/refit_seconds"] > 0
    assert engine_ro.completion_ids == megatron_ro.completion_ids  # the engine has the new weights
