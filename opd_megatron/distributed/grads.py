"""Gradient synchronisation and clipping across data, pipeline and tensor parallel groups.

The loss of a step is already normalised by the global token count (all micro-batches, all data-parallel
ranks), so data-parallel gradients are summed, not averaged.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from opd_megatron.distributed.setup import ParallelGroups


def _grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]


def is_expert_param(name: str) -> bool:
    """Parameters of a mixture-of-experts layer's experts: under expert parallelism each EP rank holds
    different ones, so their gradients are summed over the expert replicas, not the whole DP group."""
    return ".mlp.experts." in name


def _sum_flat(grads: list[torch.Tensor], group) -> None:
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def sync_grads(model: torch.nn.Module, groups: ParallelGroups) -> None:
    """Sum gradients over data-parallel replicas (expert gradients over the replicas of the same experts)
    and tie the embedding copies of the first/last stage."""
    named = [(n, p.grad) for n, p in model.named_parameters() if p.requires_grad and p.grad is not None]
    split = groups.ep_size > 1
    dense = [g for n, g in named if not (split and is_expert_param(n))]
    if groups.dp_size > 1:
        _sum_flat(dense, groups.dp_group)
    expert_group = groups.expert_dp_group
    if split and expert_group is not None and dist.get_world_size(expert_group) > 1:
        _sum_flat([g for n, g in named if is_expert_param(n)], expert_group)
    tied = groups.pp_size > 1 and getattr(model, "share_embeddings_and_output_weights", False)
    if tied and groups.embd_group is not None and (groups.is_first_stage or groups.is_last_stage):
        weight = model.shared_embedding_or_output_weight()
        if weight is not None and weight.grad is not None:
            dist.all_reduce(weight.grad, group=groups.embd_group)


def grad_norm(model: torch.nn.Module, groups: ParallelGroups) -> float:
    """Global L2 norm of the gradient, counting every logical parameter once.

    TP-sharded parameters contribute from every TP rank; TP-replicated ones (norms) from TP rank 0 only;
    the tied output layer on the last stage duplicates the embedding and is skipped there.
    """
    total = torch.zeros((), dtype=torch.float64, device=groups.device)
    tied_dup = None
    if (
        groups.pp_size > 1
        and not groups.is_first_stage
        and getattr(model, "share_embeddings_and_output_weights", False)
    ):
        tied_dup = model.shared_embedding_or_output_weight()
    experts = torch.zeros((), dtype=torch.float64, device=groups.device)
    for name, p in model.named_parameters():
        if p.grad is None or not p.requires_grad or p is tied_dup:
            continue
        sharded = getattr(p, "tensor_model_parallel", False)
        if sharded or groups.tp_rank == 0:
            sq = p.grad.detach().double().pow(2).sum()
            if groups.ep_size > 1 and is_expert_param(name):
                experts += sq
            else:
                total += sq
    if groups.ep_size > 1:  # each EP rank holds other experts: their squares add up across EP
        dist.all_reduce(experts, group=groups.ep_group)
    total += experts
    if groups.tp_size > 1:
        dist.all_reduce(total, group=groups.tp_group)
    if groups.pp_size > 1:
        dist.all_reduce(total, group=groups.pp_group)
    return math.sqrt(total.item())


def clip_grads(model: torch.nn.Module, max_norm: float, norm: float) -> None:
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for g in _grads(model):
            g.mul_(scale)


def all_finite(value: float | torch.Tensor, groups: ParallelGroups) -> bool:
    """True on every rank iff ``value`` is finite on every rank (so all ranks skip a step together)."""
    flag = torch.tensor([0.0 if math.isfinite(float(value)) else 1.0], device=groups.device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag)
    return flag.item() == 0.0


def dp_sum(value: float, groups: ParallelGroups) -> float:
    """``value`` summed over the data-parallel replicas (e.g. the step's global token count)."""
    if groups.dp_size == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=groups.device)
    dist.all_reduce(t, group=groups.dp_group)
    return float(t.item())


def dp_ratio(numerator: float, denominator: float, groups: ParallelGroups) -> float | None:
    """``sum(numerator) / sum(denominator)`` over the data-parallel replicas (e.g. pass@n from each
    rank's passing and verifiable prompts); ``None`` when the denominators sum to 0. Every replica must
    call it, also one with nothing to count."""
    t = torch.tensor([float(numerator), float(denominator)], dtype=torch.float64, device=groups.device)
    num, den = dp_sum_(t, groups).tolist()
    return num / den if den > 0 else None


def dp_sum_(t: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    """Sum ``t`` over the data-parallel replicas in place."""
    if groups.dp_size > 1:
        dist.all_reduce(t, group=groups.dp_group)
    return t
