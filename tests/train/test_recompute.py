"""``train.recompute`` (none | selective | full) changes memory, never the loss or the gradients."""

from __future__ import annotations

import torch

from tests.multirank import run_ranks

VOCAB = 48


def _loss_and_grads(rank, modes):
    from opd_megatron.config import ModelConfig, ParallelConfig
    from opd_megatron.distributed import init_distributed
    from opd_megatron.models.gpt import build_gpt_model
    from opd_megatron.train.batch import MicroBatch
    from opd_megatron.train.sft import sft_forward, sft_loss
    from opd_megatron.train.step import forward_backward

    g = init_distributed(ParallelConfig(), seed=0)
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=2, max_sequence_length=16)
    gen = torch.Generator().manual_seed(1)
    tokens_BS = torch.randint(0, VOCAB, (3, 12), generator=gen)
    mb = MicroBatch(tokens_BS, torch.roll(tokens_BS, -1, 1), torch.ones(3, 12))
    out = {}
    for mode in modes:
        model = build_gpt_model(cfg, g, VOCAB, seed=0, recompute=mode)
        assert model.config.recompute_granularity == (None if mode == "none" else mode)
        loss, _ = forward_backward(model, [mb], sft_forward, sft_loss, g, 36, ("tokens",))
        out[mode] = (loss, {n: p.grad.clone() for n, p in model.named_parameters()})
    return out


def test_recompute_modes_give_identical_loss_and_grads():
    out = run_ranks(_loss_and_grads, 1, 240, (("none", "selective", "full"),))[0]
    loss0, grads0 = out["none"]
    for mode in ("selective", "full"):
        loss, grads = out[mode]
        assert abs(loss - loss0) <= 1e-6, mode
        for n, g0 in grads0.items():
            torch.testing.assert_close(grads[n], g0, atol=1e-6, rtol=0, msg=f"{mode}: {n}")
