"""Gradient synchronisation under expert parallelism: expert gradients are summed over the replicas of
the same experts only, dense ones over the whole data-parallel group; the norm counts each expert once."""

from __future__ import annotations

import math

import pytest

from tests.multirank import run_ranks


def _ep_step(rank):
    import torch

    from opd_megatron.config import ModelConfig, ParallelConfig
    from opd_megatron.distributed import init_distributed
    from opd_megatron.distributed.grads import grad_norm, is_expert_param, sync_grads
    from opd_megatron.models.gpt import build_gpt_model

    groups = init_distributed(ParallelConfig(expert_model_parallel_size=2))
    cfg = ModelConfig(
        num_layers=1, hidden_size=32, num_attention_heads=2, max_sequence_length=16,
        num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=24,
    )  # fmt: skip
    model = build_gpt_model(cfg, groups, 48, seed=0)
    torch.manual_seed(100 + rank)  # each rank its own batch
    tokens = torch.randint(0, 48, (2, 8))
    pos = torch.arange(8).expand_as(tokens)
    model(tokens, pos, None, labels=tokens).float().sum().backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    local_sq = {n: float(g.double().pow(2).sum()) for n, g in before.items()}
    sync_grads(model, groups)
    after = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    norm = grad_norm(model, groups)
    return (
        {n: g.tolist() for n, g in before.items()},
        {n: g.tolist() for n, g in after.items()},
        {n: is_expert_param(n) for n in before},
        local_sq,
        norm,
    )


def test_expert_gradients_stay_with_their_experts_and_dense_ones_are_summed():
    import torch

    (b0, a0, ex, sq0, n0), (b1, a1, _, sq1, n1) = run_ranks(_ep_step, 2, timeout=300)
    assert any(ex.values()) and not all(ex.values())
    for name, is_expert in ex.items():
        if is_expert:  # EP=2 over 2 ranks: no replica of these experts; the gradient is this rank's own
            assert torch.equal(torch.tensor(a0[name]), torch.tensor(b0[name])), name
            assert torch.equal(torch.tensor(a1[name]), torch.tensor(b1[name])), name
        else:
            total = torch.tensor(b0[name]) + torch.tensor(b1[name])
            torch.testing.assert_close(torch.tensor(a0[name]), total)
            torch.testing.assert_close(torch.tensor(a1[name]), total)
    # the norm: dense gradients once (summed), each rank's experts once
    dense_sq = sum(float((torch.tensor(a0[n]).double() ** 2).sum()) for n in ex if not ex[n])
    expert_sq = sum(sq0[n] for n in ex if ex[n]) + sum(sq1[n] for n in ex if ex[n])
    assert n0 == pytest.approx(n1) == pytest.approx(math.sqrt(dense_sq + expert_sq), rel=1e-6)


def _ratio(rank):
    from opd_megatron.config import ParallelConfig
    from opd_megatron.distributed import init_distributed
    from opd_megatron.distributed.grads import dp_ratio

    groups = init_distributed(ParallelConfig())
    # Rank 0: 1 of 3 prompts pass; rank 1: 2 of 2; then a step where only rank 1 has anything to count.
    first = dp_ratio(*((1, 3) if rank == 0 else (2, 2)), groups)
    second = dp_ratio(*((0, 0) if rank == 0 else (1, 4)), groups)
    nothing = dp_ratio(0, 0, groups)
    return first, second, nothing


def test_dp_ratio_sums_numerators_and_denominators_over_replicas():
    for first, second, nothing in run_ranks(_ratio, 2, timeout=120):
        assert first == pytest.approx(3 / 5) and second == pytest.approx(1 / 4) and nothing is None
