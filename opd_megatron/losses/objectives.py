r"""Token-level OPD objectives on the student's sampled tokens.

Inputs are per-token log-probs of the sampled tokens ``y_t`` (``[B, T]``, the last dim is time):
``student_logprobs`` (from the model being trained; carries gradient), ``teacher_logprobs`` and, where
needed, a reference model's or the sampler's log-probs (no gradient). Every objective builds an
advantage ``A_t`` under ``torch.no_grad()`` -- the advantage never carries gradient: letting it flow
would move the target with the policy on every update -- and plugs it into
:func:`policy_gradient_loss`. Each returns an :class:`ObjectiveOutput` with the loss, the detached
per-token advantages and a few scalar metrics.

Reductions: ``reduction`` / ``normaliser`` as in :func:`opd_megatron.losses.reduce.masked_reduce`. The
default ``token_mean`` is the step's token mean (pass the global token count as ``normaliser`` under
gradient accumulation / data parallel); the papers' ``1/|y|`` per sequence is ``sequence_mean``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from opd_megatron.losses.reduce import as_weights, masked_reduce
from opd_megatron.losses.topk import topk_divergence

__all__ = [
    "ObjectiveOutput",
    "discounted_suffix_sum",
    "policy_gradient_loss",
    "minillm_loss",
    "tinker_loss",
    "gopd_loss",
    "aopd_loss",
    "opsd_loss",
    "rlsd_loss",
]


class ObjectiveOutput(NamedTuple):
    loss: torch.Tensor
    advantages: torch.Tensor
    """``[B, T]`` the per-token advantage used (detached; 0 where masked)."""
    metrics: dict[str, torch.Tensor]
    """Scalar, detached summaries over the kept tokens."""


def _check_same_shape(**tensors: torch.Tensor | None) -> None:
    shapes = {k: tuple(v.shape) for k, v in tensors.items() if v is not None}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"per-token inputs must have the same shape, got {shapes}")


def _masked_mean(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    total = w.sum()
    return torch.where(w != 0, x * w, torch.zeros_like(x)).sum() / torch.where(
        total > 0, total, torch.ones_like(total)
    )


def discounted_suffix_sum(x_BT: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    r""":math:`R_t = \sum_{t' \ge t} \gamma^{t'-t} x_{t'}` along the last dim (``gamma`` in [0, 1])."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"discount must be in [0, 1], got {gamma}")
    if gamma == 0.0:
        return x_BT.clone()
    if gamma == 1.0:
        return x_BT.flip(-1).cumsum(-1).flip(-1)
    out = torch.empty_like(x_BT)
    running = torch.zeros_like(x_BT[..., 0])
    for t in range(x_BT.shape[-1] - 1, -1, -1):  # T steps on [B] vectors
        running = x_BT[..., t] + gamma * running
        out[..., t] = running
    return out


def policy_gradient_loss(
    student_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    behaviour_logprobs: torch.Tensor | None = None,
    ratio_clip: float | None = None,
    reduction: str = "token_mean",
    normaliser: float | torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Policy-gradient surrogate with a fixed (detached) advantage.

    Without ``behaviour_logprobs``: :math:`\ell_t = -A_t \log\pi_\theta(y_t)` (on-policy REINFORCE).
    With them, the importance-sampled form :math:`\ell_t = -\rho_t A_t`,
    :math:`\rho_t = \pi_\theta(y_t) / \pi_{\text{behaviour}}(y_t)`, and with ``ratio_clip`` = ε the PPO
    form :math:`\ell_t = -\min(\rho_t A_t, \operatorname{clip}(\rho_t, 1-\epsilon, 1+\epsilon) A_t)`."""
    _check_same_shape(
        student=student_logprobs, advantages=advantages, behaviour=behaviour_logprobs, mask=mask
    )
    adv = advantages.detach()
    if behaviour_logprobs is None:
        per_token = -adv * student_logprobs
    else:
        ratio = torch.exp(student_logprobs - behaviour_logprobs.detach())
        per_token = -ratio * adv
        if ratio_clip is not None:
            clipped = -torch.clamp(ratio, 1.0 - ratio_clip, 1.0 + ratio_clip) * adv
            per_token = torch.maximum(per_token, clipped)  # -min(a, b) = max(-a, -b)
    return masked_reduce(per_token, mask, reduction, normaliser)


def _output(loss, adv, w, **metrics) -> ObjectiveOutput:
    adv = torch.where(w != 0, adv, torch.zeros_like(adv)).detach()
    return ObjectiveOutput(loss, adv, {k: v.detach() for k, v in metrics.items()})


def minillm_loss(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    gamma: float = 1.0,
    length_normalise: bool = True,
    sampling_logprobs: torch.Tensor | None = None,
    reduction: str = "token_mean",
    normaliser: float | torch.Tensor | None = None,
) -> ObjectiveOutput:
    r"""MiniLLM (Gu et al. 2023): reverse KL as a policy gradient with the teacher as reward.

    .. math::
        r_t = \log\frac{p(y_t \mid y_{<t}, x)}{q_\theta(y_t \mid y_{<t}, x)}, \qquad
        R_t = \sum_{t'=t}^{T} \gamma^{t'-t} r_{t'}, \qquad
        R^{\text{norm}}_t = \frac{R_t}{T - t + 1},

    .. math:: \nabla\mathcal{L} = -\mathbb{E}\Big[\sum_t w_t\, R^{\text{norm}}_t\, \nabla\log q_\theta(y_t)\Big],
              \qquad w_t = \frac{q_\theta(y_t)}{\tilde p(y_t)},

    where ``T - t + 1`` counts the kept tokens from ``t`` on (length normalisation, so long outputs are
    not favoured) and :math:`\tilde p = \alpha p + (1-\alpha) q_\theta` is the teacher-mixed sampling
    distribution whose log-probs are ``sampling_logprobs`` (omit them for pure student sampling,
    ``w = 1``). The single-step (full-vocabulary reverse KL) part of MiniLLM's gradient is the fused
    divergence with ``divergence="reverse_kl"``; add it separately."""
    _check_same_shape(
        student=student_logprobs, teacher=teacher_logprobs, sampling=sampling_logprobs, mask=mask
    )
    w = as_weights(mask, student_logprobs)
    with torch.no_grad():
        r = torch.where(w != 0, teacher_logprobs - student_logprobs, torch.zeros_like(student_logprobs))
        adv = discounted_suffix_sum(r, gamma)
        if length_normalise:
            remaining = discounted_suffix_sum((w != 0).to(r.dtype), 1.0)
            adv = adv / remaining.clamp(min=1.0)
        if sampling_logprobs is not None:
            adv = adv * torch.exp(student_logprobs - sampling_logprobs)
    loss = policy_gradient_loss(student_logprobs, adv, mask, reduction=reduction, normaliser=normaliser)
    return _output(loss, adv, w, reward=_masked_mean(r, w))


def tinker_loss(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    discount: float = 0.0,
    behaviour_logprobs: torch.Tensor | None = None,
    reduction: str = "token_mean",
    normaliser: float | torch.Tensor | None = None,
) -> ObjectiveOutput:
    r"""On-policy distillation as in Thinking Machines' tinker cookbook: the per-token reverse-KL
    estimate, negated, is the advantage,

    .. math:: a_t = -\big(\log\pi_S(y_t) - \log\pi_T(y_t)\big), \qquad
              A_t = \sum_{t' \ge t} \gamma^{t'-t} a_{t'},

    with discount :math:`\gamma` = ``discount`` (0, the default, keeps the per-token value). The loss is
    the importance-sampled policy gradient against the sampler's log-probs ``behaviour_logprobs``
    (plain REINFORCE when omitted)."""
    _check_same_shape(student=student_logprobs, teacher=teacher_logprobs, mask=mask)
    w = as_weights(mask, student_logprobs)
    with torch.no_grad():
        a = torch.where(w != 0, teacher_logprobs - student_logprobs, torch.zeros_like(student_logprobs))
        adv = discounted_suffix_sum(a, discount)
    loss = policy_gradient_loss(
        student_logprobs,
        adv,
        mask,
        behaviour_logprobs=behaviour_logprobs,
        reduction=reduction,
        normaliser=normaliser,
    )
    return _output(loss, adv, w, reverse_kl=-_masked_mean(a, w))


def gopd_loss(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    reference_logprobs: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    lam: float = 1.0,
    discount: float = 0.0,
    behaviour_logprobs: torch.Tensor | None = None,
    reduction: str = "token_mean",
    normaliser: float | torch.Tensor | None = None,
) -> ObjectiveOutput:
    r"""G-OPD (Yang et al. 2026): reward scaling against a reference model.

    .. math:: \mathcal{J}(\theta) = \max_\theta \mathbb{E}_{y \sim \pi_\theta}\Big[
              \lambda \log\frac{\pi^*(y)}{\pi_{\text{ref}}(y)}
              - D_{KL}\big(\pi_\theta \,\|\, \pi_{\text{ref}}\big)\Big],

    estimated per sampled token as the advantage

    .. math:: A_t = \lambda\big(\log\pi_T(y_t) - \log\pi_{\text{ref}}(y_t)\big)
              - \big(\log\pi_\theta(y_t) - \log\pi_{\text{ref}}(y_t)\big)

    (then discounted as in :func:`tinker_loss`). ``lam = 1`` is plain OPD (the reference cancels);
    ``0 < lam < 1`` lands between reference and teacher; ``lam > 1`` extrapolates past the teacher."""
    _check_same_shape(
        student=student_logprobs, teacher=teacher_logprobs, reference=reference_logprobs, mask=mask
    )
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    w = as_weights(mask, student_logprobs)
    with torch.no_grad():
        reward = lam * (teacher_logprobs - reference_logprobs)
        a = reward - (student_logprobs - reference_logprobs)
        a = torch.where(w != 0, a, torch.zeros_like(a))
        adv = discounted_suffix_sum(a, discount)
    loss = policy_gradient_loss(
        student_logprobs,
        adv,
        mask,
        behaviour_logprobs=behaviour_logprobs,
        reduction=reduction,
        normaliser=normaliser,
    )
    return _output(loss, adv, w, reward=_masked_mean(reward, w))


def aopd_loss(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    student_topk_logprobs: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    tail: str = "renorm",
    reduction: str = "token_mean",
    normaliser: float | torch.Tensor | None = None,
) -> ObjectiveOutput:
    r"""AOPD: asymmetric OPD, a per-token gate between a top-K forward KL and the OPD policy gradient.

    .. math:: \mathcal{L}_{\text{AOPD}} = \mathbb{E}\Big[\frac{1}{|y|}\sum_t G_t\,\mathcal{L}^{\text{FKL}}_t
              + (1 - G_t)\,\mathcal{L}^{\text{OPD}}_t\Big], \qquad
              G_t = \mathbb{I}\big(P_T(y_t) \le P_S(y_t)\big),

    with :math:`\mathcal{L}^{\text{FKL}}_t` the forward KL on :math:`S_t = \operatorname{TopK}(P_T, K)`
    (tail handled by ``tail``, see :mod:`~opd_megatron.losses.topk`) and
    :math:`\mathcal{L}^{\text{OPD}}_t = -A_t \log P_S(y_t)`, :math:`A_t = \log P_T(y_t) - \log P_S(y_t)`.
    Tokens the teacher does not prefer over the student (non-positive advantage, the heavy-tailed
    side) get the bounded forward KL; the rest get OPD.

    ``student_topk_logprobs`` / ``teacher_topk_logprobs`` are ``[B, T, K]``, read at the teacher's
    top-K indices (:func:`~opd_megatron.losses.topk.distributed_topk` and
    :func:`~opd_megatron.losses.topk.gather_logprobs`)."""
    _check_same_shape(student=student_logprobs, teacher=teacher_logprobs, mask=mask)
    if student_topk_logprobs.shape != teacher_topk_logprobs.shape or student_topk_logprobs.shape[:-1] != (
        student_logprobs.shape
    ):
        raise ValueError(
            f"top-K log-probs {tuple(student_topk_logprobs.shape)} / {tuple(teacher_topk_logprobs.shape)} "
            f"must be [*{tuple(student_logprobs.shape)}, K]"
        )
    w = as_weights(mask, student_logprobs)
    with torch.no_grad():
        adv = teacher_logprobs - student_logprobs
        gate = adv <= 0  # P_T(y_t) <= P_S(y_t)
    fkl = topk_divergence(teacher_topk_logprobs, student_topk_logprobs, "forward_kl", tail).per_token
    opd = -adv * student_logprobs
    per_token = torch.where(gate, fkl, opd)
    loss = masked_reduce(per_token, mask, reduction, normaliser)
    return _output(
        loss, torch.where(gate, torch.zeros_like(adv), adv), w, gate_fraction=_masked_mean(gate.float(), w)
    )


def opsd_loss(
    token_divergence: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    tau: float,
    reduction: str = "token_mean",
    normaliser: float | torch.Tensor | None = None,
) -> ObjectiveOutput:
    r"""OPSD (Self-Distilled Reasoner): per-token divergence between the privileged-information view and
    the student's own view, clipped per token so a few stylistic outliers cannot dominate:

    .. math:: \mathcal{L}_{\text{OPSD}} = \frac{1}{|\mathcal{B}|}\sum \frac{1}{|\hat y|}\sum_n
              \min\big(D(p_T(\cdot \mid \hat y_{<n}, x, y^*) \,\|\, p_S(\cdot \mid \hat y_{<n}, x)),\ \tau\big).

    ``token_divergence`` ``[B, T]`` is the per-token divergence with gradient (the reference
    :func:`~opd_megatron.losses.divergences.divergence`, or the top-k path); tokens above ``tau``
    contribute ``tau`` and no gradient. At scale use the fused loss with ``token_clip=tau``, which is
    the same objective. (The survey writes the min inside the vocabulary sum; the paper's intent, and
    this implementation, is a per-token clip.) There is no advantage: ``advantages`` holds the
    clipped divergences."""
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    w = as_weights(mask, token_divergence)
    clipped = token_divergence.clamp(max=tau)
    loss = masked_reduce(clipped, mask, reduction, normaliser)
    return _output(loss, clipped, w, clip_fraction=_masked_mean((token_divergence > tau).float(), w))


def rlsd_loss(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    sequence_advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    eps_w: float = 0.2,
    behaviour_logprobs: torch.Tensor | None = None,
    ratio_clip: float | None = None,
    reduction: str = "token_mean",
    normaliser: float | torch.Tensor | None = None,
) -> ObjectiveOutput:
    r"""RLSD (Self-Distilled RLVR): magnitude from self-distillation, direction from a verifier.

    .. math:: \Delta_t = \mathrm{sg}\big(\log P_T(y_t) - \log P_S(y_t)\big), \qquad
              w_t = \exp\big(\operatorname{sign}(A)\,\Delta_t\big) = \big(P_T(y_t)/P_S(y_t)\big)^{\operatorname{sign}(A)},

    .. math:: \mathcal{L}_{\text{RLSD}} = -\mathbb{E}\Big[\frac{1}{G}\sum_i \frac{1}{|y^{(i)}|}\sum_t
              \min\big(w_t A^{(i)},\ \operatorname{clip}(w_t, 1-\epsilon_w, 1+\epsilon_w)\, A^{(i)}\big)\Big],

    with :math:`A^{(i)}` the trajectory's (GRPO) advantage ``sequence_advantages`` ``[B]`` and
    :math:`P_T` the privileged-information view. The clipped product is the per-token advantage of a
    policy gradient on :math:`\log P_S(y_t)` (or, with ``behaviour_logprobs`` / ``ratio_clip``, of the
    usual PPO surrogate)."""
    _check_same_shape(student=student_logprobs, teacher=teacher_logprobs, mask=mask)
    if sequence_advantages.shape != student_logprobs.shape[:-1]:
        raise ValueError(
            f"sequence_advantages {tuple(sequence_advantages.shape)} must be {tuple(student_logprobs.shape[:-1])}"
        )
    if not 0 < eps_w < 1:
        raise ValueError(f"eps_w must be in (0, 1), got {eps_w}")
    w = as_weights(mask, student_logprobs)
    with torch.no_grad():
        seq_adv = sequence_advantages.unsqueeze(-1).to(student_logprobs.dtype)  # [B] -> [B, 1]
        delta = teacher_logprobs - student_logprobs
        evidence = torch.exp(torch.sign(seq_adv) * delta)
        adv = torch.minimum(evidence * seq_adv, evidence.clamp(1.0 - eps_w, 1.0 + eps_w) * seq_adv)
    loss = policy_gradient_loss(
        student_logprobs, adv, mask, behaviour_logprobs=behaviour_logprobs, ratio_clip=ratio_clip,
        reduction=reduction, normaliser=normaliser,
    )  # fmt: skip
    clipped = (evidence < 1.0 - eps_w) | (evidence > 1.0 + eps_w)
    return _output(
        loss,
        adv,
        w,
        evidence_weight=_masked_mean(evidence, w),
        clip_fraction=_masked_mean(clipped.float(), w),
    )
