"""Tensor-parallel helpers for losses over a vocabulary split across ranks.

Megatron's output layer is a ColumnParallelLinear: rank ``r`` of a TP group of size ``n`` holds the
contiguous rows ``[r * V/n, (r + 1) * V/n)`` of the (padded) vocabulary. Every function here takes the
group as an argument; ``None`` means a single process (no communication at all).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = [
    "tp_rank",
    "tp_size",
    "vocab_range",
    "all_reduce",
    "all_reduce_sum_identity_grad",
    "global_logsumexp",
]


def tp_rank(group: dist.ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group)


def tp_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def vocab_range(
    local_vocab: int, group: dist.ProcessGroup | None, vocab_size: int | None = None
) -> tuple[int, int]:
    """``(start, n_valid)`` of this rank's shard: the global index of its first row and how many of its
    ``local_vocab`` rows are real tokens (rows at global index >= ``vocab_size`` are padding)."""
    start = tp_rank(group) * local_vocab
    if vocab_size is None:
        return start, local_vocab
    return start, max(0, min(local_vocab, vocab_size - start))


def all_reduce(tensor: torch.Tensor, group: dist.ProcessGroup | None, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce that is a no-op without a group (or in a group of one)."""
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


class _AllReduceSumIdentityGrad(torch.autograd.Function):
    """Sum over the TP group in forward; identity in backward.

    Every TP rank computes the same loss from the reduced value, so the gradient each rank receives
    for the reduced value is already the full gradient of its own local contribution (Megatron's
    ``reduce_from_tensor_model_parallel_region`` has the same backward)."""

    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def all_reduce_sum_identity_grad(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _AllReduceSumIdentityGrad.apply(x, group)


def global_logsumexp(x_TV: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Differentiable log-sum-exp over a vocabulary split across ``group``: all-reduce the max, then
    the sum of exponentials. Returns ``[T]``; its gradient w.r.t. the local shard is the softmax."""
    with torch.no_grad():
        max_T = x_TV.max(dim=-1).values if x_TV.shape[-1] else x_TV.new_full(x_TV.shape[:-1], -torch.inf)
        all_reduce(max_T, group, dist.ReduceOp.MAX)
        # A row that is -inf everywhere would give (-inf) - (-inf) = nan; shift by 0 instead.
        max_T = torch.where(torch.isfinite(max_T), max_T, torch.zeros_like(max_T))
    sumexp_T = torch.exp(x_TV - max_T.unsqueeze(-1)).sum(dim=-1)  # [T, V/tp] -> [T]
    sumexp_T = all_reduce_sum_identity_grad(sumexp_T, group)
    return max_T + torch.log(sumexp_T)
