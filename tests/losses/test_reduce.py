"""Masks and reductions, including gradient accumulation and data-parallel correctness."""

from __future__ import annotations

import pytest
import torch

from opd_megatron.losses import global_token_count, masked_reduce, reduction_weights
from tests.losses.conftest import init_gloo


def test_reductions_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert masked_reduce(values, mask, "token_mean").item() == pytest.approx((1 + 2 + 4) / 3)
    assert masked_reduce(values, mask, "sequence_mean").item() == pytest.approx((1.5 + 4) / 2)
    assert masked_reduce(values, mask, "sum").item() == pytest.approx(7.0)
    assert masked_reduce(values, mask, "token_mean", normaliser=10).item() == pytest.approx(0.7)
    assert masked_reduce(values, mask, "sequence_mean", normaliser=4).item() == pytest.approx(5.5 / 4)
    torch.testing.assert_close(
        masked_reduce(values, mask, "none"), torch.tensor([[1.0, 2.0, 0.0], [4.0, 0.0, 0.0]])
    )
    # Float masks are weights.
    w = torch.tensor([[0.5, 1.0, 0.0], [2.0, 0.0, 0.0]])
    assert masked_reduce(values, w, "token_mean").item() == pytest.approx((0.5 + 2 + 8) / 3.5)


def test_masked_garbage_does_not_leak():
    values = torch.tensor([[1.0, torch.nan, torch.inf]], requires_grad=True)
    mask = torch.tensor([[True, False, False]])
    for reduction in ("token_mean", "sequence_mean", "sum"):
        out = masked_reduce(values, mask, reduction)
        out.backward()
        assert out.item() == 1.0 and torch.equal(values.grad, torch.tensor([[1.0, 0.0, 0.0]]))
        values.grad = None


def test_all_masked_is_zero_not_nan():
    values = torch.randn(2, 4, requires_grad=True)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    for reduction in ("token_mean", "sequence_mean", "sum"):
        out = masked_reduce(values, mask, reduction)
        out.backward()
        assert out.item() == 0.0 and torch.equal(values.grad, torch.zeros(2, 4))
        values.grad = None


def test_gradient_accumulation_with_global_normaliser_equals_full_batch():
    # Two micro-batches with different token counts: summing per-micro-batch losses normalised by the
    # step's total token count gives exactly the full batch's token mean (a mean of means would not).
    values = torch.randn(4, 6, requires_grad=True)
    mask = torch.rand(4, 6) > 0.3
    mask[2:, 3:] = False
    full = masked_reduce(values, mask, "token_mean")
    (g_full,) = torch.autograd.grad(full, values)
    n = global_token_count(mask)
    acc = masked_reduce(values[:2], mask[:2], "token_mean", n) + masked_reduce(
        values[2:], mask[2:], "token_mean", n
    )
    (g_acc,) = torch.autograd.grad(acc, values)
    torch.testing.assert_close(acc, full)
    torch.testing.assert_close(g_acc, g_full)
    mean_of_means = (masked_reduce(values[:2], mask[:2]) + masked_reduce(values[2:], mask[2:])) / 2
    assert abs(mean_of_means.item() - full.item()) > 1e-4


def test_reduction_weights_reproduce_the_reductions():
    values = torch.randn(3, 5)
    mask = torch.rand(3, 5) > 0.4
    mask[1] = False  # an empty sequence does not count towards the sequence mean
    for reduction in ("token_mean", "sequence_mean", "sum"):
        w = reduction_weights(mask, reduction)
        torch.testing.assert_close((w * values).sum(), masked_reduce(values, mask, reduction))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="reduction"):
        masked_reduce(torch.zeros(2), None, "mean")
    with pytest.raises(ValueError, match="normaliser"):
        masked_reduce(torch.zeros(2), None, "token_mean", normaliser=0)
    with pytest.raises(ValueError, match="mask shape"):
        masked_reduce(torch.zeros(2, 3), torch.ones(3, 2, dtype=torch.bool))


def dp_worker(rank: int):
    import torch.distributed as dist

    group = init_gloo()
    torch.manual_seed(0)
    values = torch.randn(4, 6)
    mask = torch.rand(4, 6) > 0.3
    mask[2:, 2:] = False
    mine = slice(0, 2) if rank == 0 else slice(2, 4)
    n = global_token_count(mask[mine], group)
    local = masked_reduce(values[mine], mask[mine], "token_mean", n)
    dist.all_reduce(local)  # what a summing data-parallel gradient reduction does to the loss
    return local.item(), masked_reduce(values, mask, "token_mean").item()


def test_data_parallel_global_token_count(tp2):
    for dp_loss, full in (rank["reduce"] for rank in tp2):
        assert dp_loss == pytest.approx(full, rel=1e-6)


def test_float64_normalisation_is_exact():
    # The weights and the 1/N normaliser are formed in the values' dtype: a float32 1/9 would leave
    # 7.45e-9 here.
    ones = torch.ones(9, dtype=torch.float64)
    mask = torch.ones(9, dtype=torch.bool)
    assert masked_reduce(ones, mask) - 1 == 0
    assert masked_reduce(ones, mask, "token_mean", normaliser=9) - 1 == 0
    assert masked_reduce(ones.reshape(1, 9), mask.reshape(1, 9), "sequence_mean") - 1 == 0
    assert masked_reduce(ones, None, "sum", normaliser=torch.tensor(9.0)) - 1 == 0
    assert reduction_weights(ones, "token_mean").dtype == torch.float64
    # float32 values keep float32 weights; bool masks give float32 weights
    assert reduction_weights(mask).dtype == torch.float32
