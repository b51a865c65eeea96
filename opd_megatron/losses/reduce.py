"""Token masks and loss reductions.

Every loss in this package produces one value per token and reduces it here, so "what does the loss
average over" has one answer. Masks are bool (keep / drop) or float (per-token weights; 0 drops).

Gradient accumulation and data parallel: the mean of per-micro-batch means is not the mean over the
step's tokens when micro-batches hold different numbers of tokens. Pass ``normaliser`` = the number of
loss tokens in the whole optimizer step (all micro-batches, all data-parallel ranks; see
:func:`global_token_count`) and each micro-batch contributes ``sum / normaliser``; the accumulated
gradient is then exactly the gradient of the step's token mean. If the data-parallel gradient
all-reduce *averages* (divides by the DP size), multiply the normaliser's reciprocal by the DP size,
i.e. pass ``normaliser / dp_size``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from opd_megatron.losses.tp import all_reduce

__all__ = [
    "REDUCTIONS",
    "weight_dtype",
    "as_weights",
    "reduction_weights",
    "masked_reduce",
    "global_token_count",
]

REDUCTIONS = ("none", "token_mean", "sequence_mean", "sum")


def weight_dtype(like: torch.Tensor) -> torch.dtype:
    """The dtype of loss weights for values ``like``: the values' own dtype, at least float32 (so a
    float64 loss is normalised in float64, and a bf16 one does not round its 1/N to 8 bits)."""
    if like.dtype.is_floating_point:
        return torch.promote_types(like.dtype, torch.float32)
    return torch.float32


def as_weights(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A bool/float mask as float weights (:func:`weight_dtype`) shaped like ``like`` (all ones when
    ``mask`` is None)."""
    if mask is None:
        return torch.ones(like.shape, dtype=weight_dtype(like), device=like.device)
    if mask.shape != like.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match values shape {tuple(like.shape)}")
    return mask.to(weight_dtype(like))


def _check_normaliser(normaliser) -> None:
    if normaliser is not None and not torch.is_tensor(normaliser) and not normaliser > 0:
        raise ValueError(f"normaliser must be > 0, got {normaliser!r}")


def reduction_weights(
    mask_BT: torch.Tensor, reduction: str = "token_mean", normaliser: float | torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token weights ``w`` such that ``sum(w * values)`` is the requested reduction.

    - ``token_mean``: ``sum_t m_t v_t / N``, with ``N = normaliser`` or, if None, ``sum_t m_t``.
    - ``sequence_mean``: each sequence (last dim) is averaged over its own tokens, then the sequence
      means are summed and divided by ``normaliser`` (the number of sequences in the step) or, if None,
      by the number of sequences with at least one token.
    - ``sum``: ``sum_t m_t v_t`` (divided by ``normaliser`` when given).

    A batch with no tokens gives all-zero weights (a zero loss with zero gradients), never 0/0.
    This is how the fused loss, which only sees a flat token axis, gets per-sequence reductions.
    The weights are float32, or the mask's dtype when that is a wider float (float64 weights give an
    exact float64 1/N).
    """
    if reduction not in REDUCTIONS or reduction == "none":
        raise ValueError(f"reduction must be one of {REDUCTIONS[1:]}, got {reduction!r}")
    _check_normaliser(normaliser)
    w = mask_BT.to(weight_dtype(mask_BT))
    if reduction == "sequence_mean":
        tokens_B = w.sum(dim=-1, keepdim=True)  # [B, T] -> [B, 1]
        w = w / torch.where(tokens_B > 0, tokens_B, torch.ones_like(tokens_B))
        if normaliser is None:
            normaliser = (tokens_B > 0).sum()
    elif reduction == "token_mean" and normaliser is None:
        normaliser = w.sum()
    if normaliser is None:
        return w
    normaliser = torch.as_tensor(normaliser, dtype=w.dtype, device=w.device)
    return w / torch.where(normaliser > 0, normaliser, torch.ones_like(normaliser))


def masked_reduce(
    values: torch.Tensor,
    mask: torch.Tensor | None = None,
    reduction: str = "token_mean",
    normaliser: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce per-token ``values`` (``[..., T]``) under ``mask`` (see :func:`reduction_weights`).

    ``none`` returns the values times the mask weights, with dropped tokens exactly 0 even where the
    value is nan or inf (padding positions often hold garbage). Weights and normaliser are formed in
    the values' dtype (at least float32): in float64 a token mean of ones is exactly 1."""
    w = as_weights(mask, values)
    if reduction == "none":
        return torch.where(w != 0, values * w.to(values.dtype), torch.zeros_like(values))
    w = reduction_weights(w, reduction, normaliser).to(values.dtype)
    return torch.where(w != 0, values * w, torch.zeros_like(values)).sum()


def global_token_count(mask: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum of the mask over this rank's micro-batch(es) and over ``group`` (the data-parallel group):
    the normaliser that makes accumulated, data-parallel gradients equal the global token mean."""
    count = mask.detach().to(torch.float32).sum().reshape(1)
    return all_reduce(count, group)[0]
