"""The GPU refit of the vLLM engine through vLLM's weight-transfer API (marker ``gpu``).

Unverified: these tests are skipped without CUDA, and no GPU has run them in this project's CI. They state
what the GPU path must do: greedy rollouts equal the Megatron sampler's on the same weights, before and
after an optimizer step, with the engine on the trainer's GPU (CUDA IPC, the engine sleeping between
rounds) and on a GPU of its own (NCCL).
"""

from __future__ import annotations

import pytest
import torch

from opd_megatron.rollout.vllm_host import vllm_import_error
from tests.multirank import run_ranks
from tests.rollout.test_vllm_engine import EOS, KV_BYTES, MAX_LEN, N_NEW, PAD, VOCAB, _cfg, _prompts

_SKIP = vllm_import_error()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")]


def _step(model, seed: int) -> None:
    """One Adam step on a cross-entropy of random sequences (large enough to change greedy outputs)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, VOCAB, (4, 24), generator=g).cuda()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    model.train()
    logits = model(tokens, torch.arange(24, device="cuda").expand(4, 24), None)
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1)
    )
    loss.backward()
    opt.step()
    model.eval()


def _gpu_job(rank: int, placement: str, devices: list[int]) -> dict:
    from opd_megatron.config import ParallelConfig
    from opd_megatron.distributed import init_distributed
    from opd_megatron.models.gpt import build_gpt_model
    from opd_megatron.rollout.sampler import MegatronSampler
    from opd_megatron.rollout.types import SamplingParams
    from opd_megatron.rollout.vllm_engine import VLLMEngine

    groups = init_distributed(ParallelConfig())
    model = build_gpt_model(_cfg(), groups, VOCAB, seed=0).eval()
    engine = VLLMEngine(
        model, _cfg(), groups, eos_id=EOS, pad_id=PAD, kv_cache_bytes=KV_BYTES,
        max_sequence_length=MAX_LEN, placement=placement, devices=devices,
    )  # fmt: skip
    sampler = MegatronSampler(model, groups, eos_id=EOS, pad_id=PAD)
    greedy = SamplingParams(max_new_tokens=N_NEW, temperature=0.0)
    prompts = _prompts()
    out = {
        "backend": engine.backend,
        "before": (engine.generate(prompts, greedy), sampler.generate(prompts, greedy)),
    }
    _step(model, seed=1)
    stats = engine.refit(model)
    out["after"] = (engine.generate(prompts, greedy), sampler.generate(prompts, greedy))
    out["refit"] = stats.metrics()
    engine.close()
    return out


def _check(out: dict, backend: str) -> None:
    assert out["backend"] == backend
    for when in ("before", "after"):
        ours, megatron = out[when]
        assert ours.completion_ids == megatron.completion_ids, when
    # The step changed the model, so equal outputs after it mean the refit reached the engine.
    assert out["before"][1].completion_ids != out["after"][1].completion_ids
    assert out["refit"]["rollout/refit_seconds"] > 0


def test_colocated_ipc_refit_equals_megatron_sampler():
    _check(run_ranks(_gpu_job, 1, timeout=600, args=("colocated", []))[0], "ipc")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU for the engine")
def test_separate_nccl_refit_equals_megatron_sampler():
    _check(run_ranks(_gpu_job, 1, timeout=600, args=("separate", [1]))[0], "nccl")
