"""Megatron-core DDP + optimizer (``train.optimizer_impl: megatron``) on CPU/gloo.

- DP=2 with DDP, the distributed optimizer and overlapped grad reduce equals DP=1 on the same global batch
  (and equals the torch AdamW path), fp32, 3 steps;
- bf16 with fp32 main parameters: an update below bf16 resolution still moves the fp32 main parameters
  and, after enough steps, the bf16 ones; the torch path leaves the bf16 parameters unchanged.
"""

from __future__ import annotations

import torch

from tests.multirank import run_ranks

VOCAB, ROWS, WIDTH = 48, 4, 10


def _model_cfg(dtype: str = "fp32"):
    from opd_megatron.config import ModelConfig

    return ModelConfig(
        num_layers=2, hidden_size=32, num_attention_heads=2, max_sequence_length=16, params_dtype=dtype
    )


def _global_batch():
    """ROWS sequences with completion masks of different lengths (token normalisation matters)."""
    g = torch.Generator().manual_seed(3)
    tokens_BS = torch.randint(0, VOCAB, (ROWS, WIDTH), generator=g)
    labels_BS = torch.roll(tokens_BS, -1, dims=1)
    mask_BS = torch.zeros(ROWS, WIDTH)
    for i in range(ROWS):
        mask_BS[i, 2 : 4 + 2 * i] = 1.0
    return tokens_BS, labels_BS, mask_BS


def _train(rank, impl: str, dist_opt: bool, overlap: bool, steps: int = 3):
    """``steps`` optimizer steps on the global batch split over DP ranks, one row per micro-batch."""
    from opd_megatron.config import ParallelConfig, TrainConfig
    from opd_megatron.distributed import init_distributed
    from opd_megatron.models.gpt import build_gpt_model
    from opd_megatron.train.batch import MicroBatch
    from opd_megatron.train.optim import make_optimizer
    from opd_megatron.train.sft import sft_forward, sft_loss
    from opd_megatron.train.step import forward_backward

    g = init_distributed(ParallelConfig(), seed=0)
    model = build_gpt_model(_model_cfg(), g, VOCAB, seed=0)
    tc = TrainConfig(
        lr=1e-2, warmup_steps=0, grad_clip=1.0, optimizer_impl=impl, use_distributed_optimizer=dist_opt,
        overlap_grad_reduce=overlap,
    )  # fmt: skip
    opt = make_optimizer(model, tc, g)
    tokens_BS, labels_BS, mask_BS = _global_batch()
    per_rank = ROWS // g.dp_size
    mine = range(g.dp_rank * per_rank, (g.dp_rank + 1) * per_rank)
    mbs = [MicroBatch(tokens_BS[i : i + 1], labels_BS[i : i + 1], mask_BS[i : i + 1]) for i in mine]
    losses = []
    for _ in range(steps):
        opt.set_lr(tc.lr)
        loss, _ = forward_backward(model, mbs, sft_forward, sft_loss, g, int(mask_BS.sum()), ("tokens",))
        norm, skipped = opt.step(loss, tc.grad_clip)
        assert not skipped
        losses.append(loss)
    params = {k: v.detach().clone() for k, v in model.state_dict().items() if "_extra_state" not in k}
    return losses, params


def test_dp2_distributed_optimizer_equals_dp1():
    dp1_losses, dp1_params = run_ranks(_train, 1, 240, ("megatron", False, False))[0]
    torch_losses, torch_params = run_ranks(_train, 1, 240, ("torch", False, False))[0]
    results = run_ranks(_train, 2, 300, ("megatron", True, True))
    for losses, params in results:
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(dp1_losses), atol=1e-5, rtol=0)
        for k, v in dp1_params.items():
            torch.testing.assert_close(params[k], v, atol=1e-5, rtol=0, msg=k)
    # The Megatron optimizer is the torch path's AdamW numerically (same update, same clipping).
    torch.testing.assert_close(torch.tensor(torch_losses), torch.tensor(dp1_losses), atol=1e-5, rtol=0)
    for k, v in torch_params.items():
        torch.testing.assert_close(dp1_params[k], v, atol=1e-5, rtol=0, msg=k)
    # Three steps at lr 1e-2 moved the parameters: the comparison is not between untouched copies.
    assert dp1_losses[-1] < dp1_losses[0]


def _tiny_updates(rank, impl: str, steps: int):
    """bf16 model, lr far below bf16 resolution; returns (bf16 changed after step 1, fp32 main changed
    after step 1, bf16 changed after ``steps``)."""
    from opd_megatron.config import ParallelConfig, TrainConfig
    from opd_megatron.distributed import init_distributed
    from opd_megatron.models.gpt import build_gpt_model
    from opd_megatron.train.batch import MicroBatch
    from opd_megatron.train.optim import make_optimizer
    from opd_megatron.train.sft import sft_forward, sft_loss
    from opd_megatron.train.step import forward_backward

    g = init_distributed(ParallelConfig(), seed=0)
    model = build_gpt_model(_model_cfg("bf16"), g, VOCAB, seed=0)
    # Adam's update is ~lr per element per step: 1e-5, below half the bf16 spacing of the band below.
    tc = TrainConfig(
        lr=1e-5, min_lr=1e-5, warmup_steps=0, weight_decay=0.0, grad_clip=0.0, optimizer_impl=impl
    )
    opt = make_optimizer(model, tc, g)
    weight = model.decoder.layers[0].mlp.linear_fc1.weight
    before = weight.detach().clone()
    # Elements with |w| in [2^-7, 2^-6): bf16 spacing 2^-14 (6.1e-5), so a step of ~1e-5 rounds away.
    band = (before.float().abs() >= 2**-7) & (before.float().abs() < 2**-6)
    assert band.sum() > 100
    main_before = _main_param(opt, weight)
    tokens_BS, labels_BS, mask_BS = _global_batch()
    mbs = [MicroBatch(tokens_BS, labels_BS, mask_BS)]
    changed = []
    for _ in range(steps):
        loss, _ = forward_backward(model, mbs, sft_forward, sft_loss, g, int(mask_BS.sum()), ("tokens",))
        opt.step(loss, tc.grad_clip)
        changed.append(not torch.equal(weight.detach()[band], before[band]))
        if len(changed) == 1:
            main_now = _main_param(opt, weight)
            main_moved = main_now is not None and not torch.equal(main_now[band], main_before[band])
    return changed[0], main_moved, changed[-1], weight.dtype


def _main_param(opt, weight):
    """The fp32 main copy of ``weight`` in a Megatron mixed-precision optimizer (None on the torch path)."""
    inner = getattr(getattr(opt, "opt", None), "chained_optimizers", None)
    if inner is None:
        return None
    # bf16 takes the distributed optimizer; at DP=1 its shard of a parameter is the whole (flat) parameter.
    for model_group, main_group in zip(
        inner[0].model_float16_groups, inner[0].shard_fp32_from_float16_groups
    ):
        for p, main in zip(model_group, main_group):
            if p is weight:
                assert main.dtype == torch.float32
                return main.detach().clone().view_as(weight)
    raise AssertionError("weight has no fp32 main parameter")


def test_fp32_main_params_keep_sub_resolution_updates():
    first, main_moved, last, dtype = run_ranks(_tiny_updates, 1, 240, ("megatron", 20))[0]
    assert dtype == torch.bfloat16
    assert not first, "a sub-resolution update changed the bf16 weight at once: the test lost its premise"
    assert main_moved, "the fp32 main parameter did not take the update"
    assert last, "20 accumulated sub-resolution updates never reached the bf16 weight"


def test_torch_path_loses_sub_resolution_updates_in_bf16():
    """What the Megatron path fixes: AdamW on bf16 parameters rounds every update away."""
    first, _, last, _ = run_ranks(_tiny_updates, 1, 240, ("torch", 20))[0]
    assert not first and not last
