r"""Reference divergences between a teacher and a student next-token distribution.

These are the readable ground truth: plain PyTorch on full log-probability tensors ``[..., V]``,
differentiable by autograd, used by tests (in float64) and by code that already holds full logits.
The fused vocab-parallel loss (:mod:`opd_megatron.losses.fused_kl`) must agree with them.

Conventions (``p`` = teacher ``pi_T``, ``q`` = student ``pi_theta``; all sums run over the vocabulary;
every function returns one value per token, the last dimension summed away):

- ``forward_kl``  = KL(p || q) = sum p (log p - log q). Mode-covering (SFT-like).
- ``reverse_kl``  = KL(q || p) = sum q (log q - log p). Mode-seeking (RL-like); the OPD default.
- ``jsd`` (beta)  = beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q,
  for 0 < beta < 1 (GKD's generalised JSD; beta = 0.5 is the usual JSD). The endpoints are
  *special-cased*: beta = 0 is forward KL(p || q) and beta = 1 is reverse KL(q || p). The family is
  therefore **not continuous at the endpoints**: as beta -> 0 the interior formula tends to 0 (like
  beta KL(p || q)), not to KL(p || q); likewise at beta -> 1. This is the convention of TRL's
  GKDTrainer and Liger's fused JSD, so loss values match theirs at every beta. The rescaled family
  jsd(beta) / (beta (1 - beta)) *is* continuous and tends to forward KL at 0 and reverse KL at 1;
  divide your loss weight by beta (1 - beta) if you sweep beta towards an end.
- ``skew_forward_kl`` (alpha) = KL(p || alpha p + (1 - alpha) q)   (DistiLLM, 0 <= alpha < 1)
- ``skew_reverse_kl`` (alpha) = KL(q || alpha q + (1 - alpha) p)
  Both equal the plain KL at alpha = 0 and are continuous there; the mixture bounds the log-ratio by
  -log(alpha), which keeps early-training gradients sane.
- ``tv`` = total variation = 1/2 sum |p - q|.

Zero probabilities: a term whose weight (the first KL argument) is 0 contributes exactly 0, so teacher
log-probs of -inf (masked or padded vocabulary) are fine for every divergence whose true value is
finite. Reverse KL is +inf where the student puts mass on a token the teacher gives -inf; that is
the true value, and it is returned (the training loop's non-finite guard then skips the step). Use
``skew_reverse_kl`` with alpha > 0, or exclude the tokens on both sides, if that can happen.

Temperature: logits are divided by the same T on both sides before the softmax, the same T the sampler
uses; ``scale_by_t2`` multiplies the loss by T^2 so gradient size does not shrink with T (Hinton).
"""

from __future__ import annotations

import math

import torch

from opd_megatron.config import DIVERGENCES
from opd_megatron.losses.reduce import masked_reduce

__all__ = [
    "DIVERGENCES",
    "check_divergence",
    "forward_kl",
    "reverse_kl",
    "jsd",
    "skew_forward_kl",
    "skew_reverse_kl",
    "total_variation",
    "divergence",
    "logprobs_from_logits",
    "divergence_from_logits",
]


def check_divergence(name: str, jsd_beta: float = 0.5, skew_alpha: float = 0.1) -> None:
    """Raise ValueError for an unknown divergence or an out-of-range parameter."""
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; allowed: {', '.join(DIVERGENCES)}")
    if not 0.0 <= jsd_beta <= 1.0:
        raise ValueError(f"jsd_beta must be in [0, 1], got {jsd_beta}")
    if not 0.0 <= skew_alpha < 1.0:
        raise ValueError(f"skew_alpha must be in [0, 1), got {skew_alpha}")


def _drop_dead(t: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Entries with zero probability on both sides (padded vocabulary) contribute 0 to every divergence;
    # replacing both -inf by 0 keeps them at 0 and keeps autograd away from (-inf) - (-inf).
    dead = torch.isneginf(t) & torch.isneginf(s)
    zero = torch.zeros((), dtype=t.dtype, device=t.device)
    return torch.where(dead, zero, t), torch.where(dead, zero, s)


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) = sum a (log a - log b) with 0 log(0 / b) = 0, autograd-safe at a = 0."""
    a = log_a.exp()
    live = a != 0  # not `> 0`: a nan must propagate, not be dropped as a zero-probability term
    zero = torch.zeros((), dtype=a.dtype, device=a.device)
    diff = torch.where(live, log_a, zero) - torch.where(live, log_b, zero)
    return torch.where(live, a * diff, zero).sum(dim=-1)  # [..., V] -> [...]


def _log_mix(weight: float, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """log(weight * a + (1 - weight) * b) for 0 < weight < 1, in log space."""
    return torch.logaddexp(log_a + math.log(weight), log_b + math.log1p(-weight))


def forward_kl(teacher_logprobs_TV: torch.Tensor, student_logprobs_TV: torch.Tensor) -> torch.Tensor:
    r"""Forward KL, teacher first: :math:`KL(p_T \| q_\theta) = \sum_v p_T(v) \log(p_T(v)/q_\theta(v))`."""
    t, s = _drop_dead(teacher_logprobs_TV, student_logprobs_TV)
    return _kl(t, s)


def reverse_kl(teacher_logprobs_TV: torch.Tensor, student_logprobs_TV: torch.Tensor) -> torch.Tensor:
    r"""Reverse KL, student first: :math:`KL(q_\theta \| p_T) = \sum_v q_\theta(v) \log(q_\theta(v)/p_T(v))`."""
    t, s = _drop_dead(teacher_logprobs_TV, student_logprobs_TV)
    return _kl(s, t)


def jsd(
    teacher_logprobs_TV: torch.Tensor, student_logprobs_TV: torch.Tensor, beta: float = 0.5
) -> torch.Tensor:
    r"""Generalised Jensen-Shannon divergence (GKD):

    .. math:: JSD_\beta(p_T, q_\theta) = \beta\, KL(p_T \| m) + (1-\beta)\, KL(q_\theta \| m),
              \quad m = \beta p_T + (1-\beta) q_\theta,

    with the endpoints special-cased: :math:`\beta=0` is forward KL, :math:`\beta=1` reverse KL (not
    the limits of the interior formula, which tend to 0; see the module docstring)."""
    if beta == 0.0:
        return forward_kl(teacher_logprobs_TV, student_logprobs_TV)
    if beta == 1.0:
        return reverse_kl(teacher_logprobs_TV, student_logprobs_TV)
    t, s = _drop_dead(teacher_logprobs_TV, student_logprobs_TV)
    log_m = _log_mix(beta, t, s)
    return beta * _kl(t, log_m) + (1.0 - beta) * _kl(s, log_m)


def skew_forward_kl(
    teacher_logprobs_TV: torch.Tensor, student_logprobs_TV: torch.Tensor, alpha: float = 0.1
) -> torch.Tensor:
    r"""DistiLLM skew KL: :math:`KL(p_T \| \alpha p_T + (1-\alpha) q_\theta)`; alpha = 0 is forward KL."""
    if alpha == 0.0:
        return forward_kl(teacher_logprobs_TV, student_logprobs_TV)
    t, s = _drop_dead(teacher_logprobs_TV, student_logprobs_TV)
    return _kl(t, _log_mix(alpha, t, s))


def skew_reverse_kl(
    teacher_logprobs_TV: torch.Tensor, student_logprobs_TV: torch.Tensor, alpha: float = 0.1
) -> torch.Tensor:
    r"""DistiLLM skew reverse KL: :math:`KL(q_\theta \| \alpha q_\theta + (1-\alpha) p_T)`; alpha = 0 is
    reverse KL."""
    if alpha == 0.0:
        return reverse_kl(teacher_logprobs_TV, student_logprobs_TV)
    t, s = _drop_dead(teacher_logprobs_TV, student_logprobs_TV)
    return _kl(s, _log_mix(alpha, s, t))


def total_variation(teacher_logprobs_TV: torch.Tensor, student_logprobs_TV: torch.Tensor) -> torch.Tensor:
    r"""Total variation distance :math:`\tfrac12 \sum_v |p_T(v) - q_\theta(v)|` (in [0, 1])."""
    return 0.5 * (teacher_logprobs_TV.exp() - student_logprobs_TV.exp()).abs().sum(
        dim=-1
    )  # [..., V] -> [...]


def divergence(
    teacher_logprobs_TV: torch.Tensor,
    student_logprobs_TV: torch.Tensor,
    name: str = "reverse_kl",
    *,
    jsd_beta: float = 0.5,
    skew_alpha: float = 0.1,
) -> torch.Tensor:
    """Per-token divergence ``name`` (one of ``DIVERGENCES``) between normalised log-probs ``[..., V]``."""
    check_divergence(name, jsd_beta, skew_alpha)
    t, s = teacher_logprobs_TV, student_logprobs_TV
    if name == "forward_kl":
        return forward_kl(t, s)
    if name == "reverse_kl":
        return reverse_kl(t, s)
    if name == "jsd":
        return jsd(t, s, jsd_beta)
    if name == "skew_forward_kl":
        return skew_forward_kl(t, s, skew_alpha)
    if name == "skew_reverse_kl":
        return skew_reverse_kl(t, s, skew_alpha)
    return total_variation(t, s)


def logprobs_from_logits(
    logits_TV: torch.Tensor, temperature: float = 1.0, vocab_size: int | None = None
) -> torch.Tensor:
    """``log_softmax(logits / T)`` in at least float32; columns at index >= ``vocab_size`` (padded
    vocabulary rows of the output layer) get probability 0."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    x = logits_TV.to(torch.promote_types(logits_TV.dtype, torch.float32)) / temperature
    if vocab_size is not None and vocab_size < x.shape[-1]:
        padded = torch.arange(x.shape[-1], device=x.device) >= vocab_size
        x = x.masked_fill(padded, -torch.inf)
    return torch.log_softmax(x, dim=-1)


def divergence_from_logits(
    teacher_logits_TV: torch.Tensor,
    student_logits_TV: torch.Tensor,
    name: str = "reverse_kl",
    *,
    jsd_beta: float = 0.5,
    skew_alpha: float = 0.1,
    temperature: float = 1.0,
    scale_by_t2: bool = False,
    mask: torch.Tensor | None = None,
    reduction: str = "token_mean",
    normaliser: float | torch.Tensor | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """The naive (unfused) loss on full logits: temperature, log-softmax, divergence, mask, reduction.

    ``reduction`` and ``normaliser`` as in :func:`opd_megatron.losses.reduce.masked_reduce`; with
    ``reduction="none"`` the per-token values (masked to 0) are returned."""
    t = logprobs_from_logits(teacher_logits_TV.detach(), temperature, vocab_size)
    s = logprobs_from_logits(student_logits_TV, temperature, vocab_size)
    per_token = divergence(t, s, name, jsd_beta=jsd_beta, skew_alpha=skew_alpha)
    if scale_by_t2:
        per_token = per_token * temperature**2
    return masked_reduce(per_token, mask, reduction, normaliser)
