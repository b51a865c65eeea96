"""Length-aware batching: token-budget micro-batches equal padded batching in loss and gradients."""

from __future__ import annotations

import pytest
import torch

from opd_megatron.train.batch import token_budget_split
from tests.multirank import run_ranks

VOCAB = 48


def test_token_budget_split_respects_budget_and_groups_by_length():
    lengths = [30, 5, 28, 6, 7, 29, 4, 50]
    parts = token_budget_split(range(len(lengths)), lengths, max_tokens=60)
    assert sorted(i for p in parts for i in p) == list(range(len(lengths)))
    for p in parts:
        width = max(lengths[i] for i in p)
        assert len(p) * width <= 60 or len(p) == 1  # a rollout over the budget goes alone
    # Longest first, greedily: long rollouts travel together, short ones together.
    assert [sorted(lengths[i] for i in p) for p in parts] == [[50], [29, 30], [7, 28], [4, 5, 6]]


def test_token_budget_split_rejects_nothing_and_keeps_one_oversized_row():
    assert token_budget_split([0], [100], max_tokens=10) == [[0]]
    assert token_budget_split([], [], max_tokens=10) == []


def _opd_batch():
    from opd_megatron.data.jsonl import PromptRow
    from opd_megatron.train.batch import OPDBatch

    g = torch.Generator().manual_seed(5)
    # Mixed lengths: a few long rollouts among many short ones.
    plen = [3, 4, 3, 5, 4, 3, 4, 3]
    clen = [2, 14, 3, 2, 15, 2, 3, 13]
    prompts = [torch.randint(1, VOCAB, (p,), generator=g).tolist() for p in plen]
    comps = [torch.randint(1, VOCAB, (c,), generator=g).tolist() for c in clen]
    rows = [PromptRow(prompt=f"p{i}", domain="d") for i in range(len(plen))]
    return OPDBatch(
        rows, prompts, comps, [[0.0] * c for c in clen], [[1.0] * c for c in clen], lam=1.0, n_on=len(plen)
    )


def _loss_and_grads(rank, budget: int):
    from opd_megatron.config import ModelConfig, ParallelConfig
    from opd_megatron.distributed import init_distributed
    from opd_megatron.models.gpt import build_gpt_model
    from opd_megatron.train.batch import opd_microbatch, padding_fraction
    from opd_megatron.train.sft import sft_forward, sft_loss
    from opd_megatron.train.step import forward_backward

    g = init_distributed(ParallelConfig(), seed=0)
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=2, max_sequence_length=32)
    model = build_gpt_model(cfg, g, VOCAB, seed=0)
    batch = _opd_batch()
    lengths = [len(p) + len(c) for p, c in zip(batch.prompts, batch.comps)]
    if budget:  # each micro-batch as wide as its own longest rollout
        parts = token_budget_split(range(len(lengths)), lengths, budget)
        mbs = [opd_microbatch(batch, p, max(lengths[i] for i in p), len(p), 0, g.device) for p in parts]
    else:  # the padded layout: micro_batch_size rows, all as wide as the step's longest rollout
        mbs = [opd_microbatch(batch, range(i, i + 4), max(lengths), 4, 0, g.device) for i in (0, 4)]
    loss, m = forward_backward(model, mbs, sft_forward, sft_loss, g, batch.tokens, ("tokens",))
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss, m["tokens"], grads, padding_fraction(mbs), len(mbs)


@pytest.fixture(scope="module")
def both():
    return run_ranks(_loss_and_grads, 1, 240, (0,))[0], run_ranks(_loss_and_grads, 1, 240, (40,))[0]


def test_token_budget_equals_padded_batching(both):
    (loss_p, tok_p, grads_p, _, _), (loss_b, tok_b, grads_b, _, n_b) = both
    assert tok_p == tok_b == sum([2, 14, 3, 2, 15, 2, 3, 13])
    assert n_b > 2  # the budget really re-split the batch
    assert abs(loss_p - loss_b) <= 1e-6
    for name, gp in grads_p.items():
        torch.testing.assert_close(grads_b[name], gp, atol=1e-6, rtol=0, msg=name)


def test_token_budget_lowers_padding_fraction(both):
    (_, _, _, pad_padded, _), (_, _, _, pad_budget, _) = both
    assert pad_budget < pad_padded
    assert pad_padded > 0.4 and pad_budget < 0.2, (pad_padded, pad_budget)
