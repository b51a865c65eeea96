"""The vLLM engine of a student trained at TP=2 and at PP=2: the weights are gathered from both ranks onto
the engine rank, whose engine runs in a helper process (the rank is part of a 2-process world), and
greedy rollouts equal the Megatron sampler's on the same layout, before and after a refit."""

from __future__ import annotations

import pytest
import torch

from opd_megatron.rollout.vllm_host import vllm_import_error
from tests.multirank import run_ranks

_SKIP = vllm_import_error()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")

VOCAB, PAD, EOS, N_NEW, MAX_LEN = 40, 0, 2, 10, 64
SHAPE = {"num_layers": 2, "hidden_size": 128, "num_attention_heads": 4, "num_query_groups": 2}


def _perturb(model) -> None:
    """Change every weight the same way on every rank (noise seeded by the parameter's name), so
    replicated parameters stay equal across TP ranks."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = torch.Generator().manual_seed(sum(map(ord, name)))
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _layout(groups, untied: bool) -> dict:
    from opd_megatron.config import ModelConfig
    from opd_megatron.models.gpt import build_gpt_model
    from opd_megatron.rollout.sampler import MegatronSampler
    from opd_megatron.rollout.types import SamplingParams
    from opd_megatron.rollout.vllm_engine import VLLMEngine

    cfg = ModelConfig(**SHAPE, max_sequence_length=MAX_LEN, init_method_std=0.1, tie_embeddings=not untied)
    model = build_gpt_model(cfg, groups, VOCAB, seed=0)
    engine = VLLMEngine(model, cfg, groups, eos_id=EOS, pad_id=PAD, kv_cache_bytes=8 << 20)
    sampler = MegatronSampler(model, groups, eos_id=EOS, pad_id=PAD)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in (3, 7, 1, 5, 9)]
    greedy = SamplingParams(max_new_tokens=N_NEW, temperature=0.0)
    out = {"before": (engine.generate(prompts, greedy), sampler.generate(prompts, greedy))}
    _perturb(model)
    out["refit"] = engine.refit(model)
    out["after"] = (engine.generate(prompts, greedy), sampler.generate(prompts, greedy))
    engine.close()
    return out


def _job(rank: int) -> dict:
    from opd_megatron.config import ParallelConfig
    from opd_megatron.distributed import init_distributed

    out = {"tp2": _layout(init_distributed(ParallelConfig(tensor_model_parallel_size=2)), untied=False)}
    out["pp2"] = _layout(init_distributed(ParallelConfig(pipeline_model_parallel_size=2)), untied=True)
    return out


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(_job, world_size=2, timeout=900)


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_greedy_equals_megatron_before_and_after_refit(ranks, layout):
    for out in ranks:  # every rank of the model gets the same rollout
        for when in ("before", "after"):
            engine, megatron = out[layout][when]
            assert engine.completion_ids == megatron.completion_ids, (layout, when)
            for a, b in zip(engine.logprobs, megatron.logprobs):
                assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5
        assert out[layout]["before"][0].completion_ids != out[layout]["after"][0].completion_ids
    stats = [out[layout]["refit"] for out in ranks]
    assert stats[0].load_seconds == stats[1].load_seconds  # measured on the engine rank, shared
    # fp32 Llama, 2 layers, hidden 128, ffn 352, vocabulary 40 (tied in tp2, untied in pp2)
    per_layer = 4 * (2 * 128 + 2 * 128 * 128 + 2 * 64 * 128 + 3 * 128 * 352)
    embed = 4 * 40 * 128 * (1 if layout == "tp2" else 2)
    assert stats[0].weight_bytes == 2 * per_layer + embed + 4 * 128
