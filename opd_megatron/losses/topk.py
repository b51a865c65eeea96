r"""Sparse top-k distillation, for teachers that return only their top-k log-probs (remote teachers).

Three pieces:

- :func:`distributed_topk`: top-k over a vocabulary split across TP ranks (local top-k on each shard,
  all-gather the ``tp * k`` candidates, global top-k of those). Equal to ``torch.topk`` on the
  gathered vocabulary, because every global top-k entry is in the top-k of its own shard.
- :func:`gather_logprobs`: the student's normalised log-probs at given *global* vocabulary indices,
  from its logits shard: the log-normaliser is reduced over TP and each index is read on the rank that
  owns it. Differentiable w.r.t. the logits.
- :func:`topk_divergence`: a divergence from :mod:`~opd_megatron.losses.divergences` on the top-k
  support, with one of two documented treatments of the tail mass the teacher did not send:

  ``renorm``: both distributions restricted to the k tokens and renormalised there,
  :math:`\tilde p_i = p_i / \sum_{j \in K} p_j` (same for the student). Ignores the tail.

  ``rest``: k + 1 buckets, the k tokens plus one "rest" bucket holding
  :math:`1 - \sum_{j \in K} p_j` (and the same for the student, whose rest is computed from its
  full-vocabulary log-probs). Keeps the divergence sensitive to how much mass the student puts outside
  the teacher's top-k. The rest mass is floored at the dtype's epsilon: below it, ``1 - sum`` is
  rounding noise.

  With k = V both equal the full-vocabulary divergence. The teacher's top-k mass
  :math:`\sum_{j \in K} p_j` is returned for logging: when it is small, neither treatment is the full
  divergence.

Temperature: the student's logits are divided by ``temperature``; the teacher's top-k log-probs must
already be at that temperature (ask the teacher service to score with it), since the tail needed to
re-temper them is not available.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist

from opd_megatron.losses.divergences import divergence as _divergence
from opd_megatron.losses.reduce import masked_reduce
from opd_megatron.losses.tp import all_reduce_sum_identity_grad, global_logsumexp, tp_size, vocab_range

__all__ = [
    "TAILS",
    "TopK",
    "TopKDivergence",
    "distributed_topk",
    "gather_logprobs",
    "topk_divergence",
    "TopKLossOutput",
    "topk_distillation_loss",
]

TAILS = ("renorm", "rest")


class TopK(NamedTuple):
    values: torch.Tensor
    """``[..., k]`` the k largest entries, in descending order."""
    indices: torch.Tensor
    """``[..., k]`` their global vocabulary indices."""


class TopKDivergence(NamedTuple):
    per_token: torch.Tensor
    """``[...]`` the divergence on the top-k support (differentiable w.r.t. the student)."""
    teacher_mass: torch.Tensor
    """``[...]`` the teacher's probability mass inside its top-k (detached), for logging."""


def distributed_topk(
    x_TV: torch.Tensor, k: int, tp_group: dist.ProcessGroup | None = None, vocab_size: int | None = None
) -> TopK:
    """Top-k of ``x`` (logits or log-probs) over the vocabulary split across ``tp_group``; padded rows
    (global index >= ``vocab_size``) never win. Not differentiable (indices are what matters)."""
    V_local = x_TV.shape[-1]
    start, n_valid = vocab_range(V_local, tp_group, vocab_size)
    n = tp_size(tp_group)
    total = V_local * n if vocab_size is None else vocab_size
    if not 0 < k <= total:
        raise ValueError(f"k must be in [1, {total}], got {k}")
    with torch.no_grad():
        k_local = min(k, n_valid)
        values, idx = x_TV[..., :n_valid].topk(k_local, dim=-1)  # [..., k_local]
        idx = idx + start
        if n == 1:
            return TopK(values, idx)
        # Every rank sends exactly k candidates (padding with -inf when its shard is smaller than k).
        pad = k - k_local
        if pad:
            values = torch.cat([values, values.new_full((*values.shape[:-1], pad), -torch.inf)], dim=-1)
            idx = torch.cat([idx, idx.new_zeros((*idx.shape[:-1], pad))], dim=-1)
        all_values = [torch.empty_like(values) for _ in range(n)]
        all_idx = [torch.empty_like(idx) for _ in range(n)]
        dist.all_gather(all_values, values.contiguous(), group=tp_group)
        dist.all_gather(all_idx, idx.contiguous(), group=tp_group)
        cand_values = torch.cat(all_values, dim=-1)  # [..., tp * k]
        cand_idx = torch.cat(all_idx, dim=-1)
        top_values, pos = cand_values.topk(k, dim=-1)  # [..., tp * k] -> [..., k]
        return TopK(top_values, cand_idx.gather(-1, pos))


def gather_logprobs(
    logits_TV: torch.Tensor,
    indices_TK: torch.Tensor,
    tp_group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """``log_softmax(logits / temperature)`` over the whole (TP-split) vocabulary, read at the global
    ``indices_TK`` ``[..., k]``. Differentiable w.r.t. ``logits_TV`` (this rank's shard ``[..., V/tp]``)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    start, n_valid = vocab_range(logits_TV.shape[-1], tp_group, vocab_size)
    x = logits_TV[..., :n_valid]
    x = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 maths for bf16 logits, fp64 kept
    if temperature != 1.0:
        x = x / temperature
    lse_T = global_logsumexp(x, tp_group)
    local = indices_TK - start
    owned = (local >= 0) & (local < n_valid)
    picked_TK = x.gather(-1, local.clamp(0, max(n_valid - 1, 0))) if n_valid else x.new_zeros(local.shape)
    picked_TK = torch.where(owned, picked_TK, torch.zeros_like(picked_TK))
    # Each index is owned by exactly one rank: summing over ranks reads it there.
    picked_TK = all_reduce_sum_identity_grad(picked_TK, tp_group)
    return picked_TK - lse_T.unsqueeze(-1)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate on both sides of -log 2."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _with_rest(topk_logprobs_TK: torch.Tensor) -> torch.Tensor:
    """Append the log-mass outside the top-k (floored at eps): ``[..., k] -> [..., k + 1]``."""
    eps = torch.finfo(topk_logprobs_TK.dtype).eps
    inside = torch.logsumexp(topk_logprobs_TK, dim=-1, keepdim=True).clamp(max=math.log1p(-eps))
    return torch.cat([topk_logprobs_TK, _log1mexp(inside)], dim=-1)


def topk_divergence(
    teacher_topk_logprobs_TK: torch.Tensor,
    student_topk_logprobs_TK: torch.Tensor,
    divergence: str = "forward_kl",
    tail: str = "renorm",
    *,
    jsd_beta: float = 0.5,
    skew_alpha: float = 0.1,
) -> TopKDivergence:
    """Divergence between teacher and student on the teacher's top-k tokens, tail handled by ``tail``
    (``renorm`` or ``rest``, see the module docstring). Both inputs are full-vocabulary normalised
    log-probs read at the same k indices, ``[..., k]``."""
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    t = teacher_topk_logprobs_TK.detach()
    s = student_topk_logprobs_TK
    teacher_mass = torch.logsumexp(t, dim=-1).exp()
    if tail == "renorm":
        t = t - torch.logsumexp(t, dim=-1, keepdim=True)
        s = s - torch.logsumexp(s, dim=-1, keepdim=True)
    else:
        t, s = _with_rest(t), _with_rest(s)
    per_token = _divergence(t, s, divergence, jsd_beta=jsd_beta, skew_alpha=skew_alpha)
    return TopKDivergence(per_token, teacher_mass)


class TopKLossOutput(NamedTuple):
    loss: torch.Tensor
    per_token: torch.Tensor
    """``[...]`` detached per-token divergence (0 where masked)."""
    teacher_mass: torch.Tensor
    """``[...]`` the teacher's top-k mass per token (detached)."""


def topk_distillation_loss(
    student_logits_TV: torch.Tensor,
    teacher_topk_logprobs_TK: torch.Tensor,
    teacher_topk_indices_TK: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    normaliser: float | torch.Tensor | None = None,
    reduction: str = "token_mean",
    divergence: str = "forward_kl",
    tail: str = "renorm",
    jsd_beta: float = 0.5,
    skew_alpha: float = 0.1,
    temperature: float = 1.0,
    scale_by_t2: bool = False,
    tp_group: dist.ProcessGroup | None = None,
    vocab_size: int | None = None,
) -> TopKLossOutput:
    """The sparse path end to end: student log-probs at the teacher's top-k indices (gathered across TP
    shards), :func:`topk_divergence`, mask and reduction (:func:`~opd_megatron.losses.reduce.masked_reduce`)."""
    student_topk = gather_logprobs(
        student_logits_TV, teacher_topk_indices_TK, tp_group, temperature, vocab_size
    )
    div = topk_divergence(
        teacher_topk_logprobs_TK.to(student_topk.dtype), student_topk, divergence, tail,
        jsd_beta=jsd_beta, skew_alpha=skew_alpha,
    )  # fmt: skip
    per_token = div.per_token * (temperature**2 if scale_by_t2 else 1.0)
    loss = masked_reduce(per_token, mask, reduction, normaliser)
    return TopKLossOutput(loss, masked_reduce(div.per_token.detach(), mask, "none"), div.teacher_mass)
