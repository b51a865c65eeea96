"""Token-level OPD objectives: hand-computed advantages, gradient = -A * grad log pi, no advantage grad."""

from __future__ import annotations

import pytest
import torch

from opd_megatron.losses import (
    aopd_loss,
    discounted_suffix_sum,
    divergence,
    gopd_loss,
    minillm_loss,
    opsd_loss,
    policy_gradient_loss,
    rlsd_loss,
    tinker_loss,
    topk_divergence,
)


def _logprobs(B=3, T=5):
    student = torch.log(torch.rand(B, T, dtype=torch.float64) * 0.9 + 0.05).requires_grad_()
    teacher = torch.log(torch.rand(B, T, dtype=torch.float64) * 0.9 + 0.05)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 3:] = False
    mask[2, 4:] = False
    return student, teacher, mask


def _check_pg_gradient(out, student, mask):
    """The advantage is a constant: the gradient is -A * mask / N w.r.t. log pi (token mean)."""
    assert not out.advantages.requires_grad
    (grad,) = torch.autograd.grad(out.loss, student)
    torch.testing.assert_close(grad, -out.advantages * mask / mask.sum())


def test_discounted_suffix_sum():
    x = torch.tensor([[1.0, 2.0, 3.0]])
    torch.testing.assert_close(discounted_suffix_sum(x, 1.0), torch.tensor([[6.0, 5.0, 3.0]]))
    torch.testing.assert_close(discounted_suffix_sum(x, 0.0), x)
    torch.testing.assert_close(discounted_suffix_sum(x, 0.5), torch.tensor([[1 + 1 + 0.75, 2 + 1.5, 3.0]]))
    with pytest.raises(ValueError, match="discount"):
        discounted_suffix_sum(x, 1.5)


def test_minillm_suffix_return_with_length_normalisation():
    student, teacher, mask = _logprobs()
    out = minillm_loss(student, teacher, mask)
    r = torch.where(mask, teacher - student.detach(), 0)
    b = 0  # by hand for the first sequence: 3 kept tokens
    want = [(r[b, 0] + r[b, 1] + r[b, 2]) / 3, (r[b, 1] + r[b, 2]) / 2, r[b, 2] / 1]
    torch.testing.assert_close(out.advantages[b, :3], torch.stack(want))
    assert not out.advantages[b, 3:].any()
    _check_pg_gradient(out, student, mask)
    raw = minillm_loss(student, teacher, mask, length_normalise=False)
    torch.testing.assert_close(raw.advantages[b, 0], r[b, :3].sum())
    # Teacher-mixed sampling: importance weight q / p_mix on the advantage.
    mix = torch.log(0.5 * teacher.exp() + 0.5 * student.detach().exp())
    weighted = minillm_loss(student, teacher, mask, sampling_logprobs=mix)
    torch.testing.assert_close(weighted.advantages, out.advantages * torch.exp(student.detach() - mix) * mask)


def test_tinker_advantage_and_discount():
    student, teacher, mask = _logprobs()
    out = tinker_loss(student, teacher, mask)
    torch.testing.assert_close(out.advantages, torch.where(mask, -(student.detach() - teacher), 0))
    _check_pg_gradient(out, student, mask)
    assert out.metrics["reverse_kl"].item() == pytest.approx((student.detach() - teacher)[mask].mean().item())
    disc = tinker_loss(student, teacher, mask, discount=0.9)
    torch.testing.assert_close(disc.advantages, discounted_suffix_sum(out.advantages, 0.9) * mask)
    # With the sampler's log-probs equal to the current ones, the importance-sampled loss has the
    # same gradient as REINFORCE.
    is_out = tinker_loss(student, teacher, mask, behaviour_logprobs=student.detach())
    _check_pg_gradient(is_out, student, mask)


def test_gopd_lambda_one_is_opd_and_lambda_above_one_extrapolates():
    student, teacher, mask = _logprobs()
    reference = torch.log(torch.rand(3, 5, dtype=torch.float64) * 0.9 + 0.05)
    one = gopd_loss(student, teacher, reference, mask, lam=1.0)
    torch.testing.assert_close(one.advantages, tinker_loss(student, teacher, mask).advantages)
    lam = 1.5
    ext = gopd_loss(student, teacher, reference, mask, lam=lam)
    want = lam * (teacher - reference) - (student.detach() - reference)
    torch.testing.assert_close(ext.advantages, torch.where(mask, want, 0))
    _check_pg_gradient(ext, student, mask)
    # lam > 1 rewards tokens the teacher likes more than the reference *more* than plain OPD does.
    gain = (ext.advantages - one.advantages)[mask]
    torch.testing.assert_close(gain, (0.5 * (teacher - reference))[mask])
    with pytest.raises(ValueError, match="lam"):
        gopd_loss(student, teacher, reference, mask, lam=-1.0)


def test_aopd_gate_routes_tokens():
    B, T, V, K = 2, 4, 9, 3
    s_logits = torch.randn(B, T, V, dtype=torch.float64, requires_grad=True)
    t_lp_full = torch.log_softmax(torch.randn(B, T, V, dtype=torch.float64), -1)
    s_lp_full = torch.log_softmax(s_logits, -1)
    y = torch.randint(0, V, (B, T))
    student = s_lp_full.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    teacher = t_lp_full.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    idx = t_lp_full.topk(K, -1).indices
    mask = torch.ones(B, T, dtype=torch.bool)
    out = aopd_loss(student, teacher, s_lp_full.gather(-1, idx), t_lp_full.gather(-1, idx), mask)
    gate = teacher <= student.detach()
    assert 0 < gate.sum() < B * T, "the test needs both kinds of token"
    fkl = topk_divergence(t_lp_full.gather(-1, idx), s_lp_full.gather(-1, idx), "forward_kl").per_token
    adv = teacher - student.detach()
    want = torch.where(gate, fkl, -adv * student).mean()
    torch.testing.assert_close(out.loss, want)
    assert out.metrics["gate_fraction"].item() == pytest.approx(gate.double().mean().item())
    torch.testing.assert_close(out.advantages, torch.where(gate, 0, adv))
    with pytest.raises(ValueError, match="top-K"):
        aopd_loss(student, teacher, s_lp_full.gather(-1, idx)[..., :2], t_lp_full.gather(-1, idx), mask)


def test_opsd_per_token_clip():
    t = torch.log_softmax(torch.randn(2, 6, 11, dtype=torch.float64) * 3, -1)
    z = torch.randn(2, 6, 11, dtype=torch.float64, requires_grad=True)
    d = divergence(t, torch.log_softmax(z, -1), "jsd")
    tau = d.detach().median().item()
    mask = torch.ones(2, 6, dtype=torch.bool)
    out = opsd_loss(d, mask, tau=tau)
    torch.testing.assert_close(out.loss, d.clamp(max=tau).mean())
    (grad,) = torch.autograd.grad(out.loss, z)
    above = d.detach() > tau
    assert above.any() and not grad[above].any() and grad[~above].abs().sum() > 0
    assert out.metrics["clip_fraction"].item() == pytest.approx(above.double().mean().item())
    with pytest.raises(ValueError, match="tau"):
        opsd_loss(d, mask, tau=0.0)


def test_rlsd_evidence_weights_and_clip():
    student = torch.log(
        torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]], dtype=torch.float64)
    ).requires_grad_()
    teacher = torch.log(torch.tensor([[0.9, 0.5, 0.2], [0.9, 0.5, 0.2]], dtype=torch.float64))
    seq_adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    mask = torch.ones(2, 3, dtype=torch.bool)
    out = rlsd_loss(student, teacher, seq_adv, mask, eps_w=0.2)
    # A > 0: w = P_T / P_S = (1.8, 1.0, 0.4); min(w A, clip(w) A) = (1.2, 1.0, 0.4).
    # A < 0: w = P_S / P_T = (0.556, 1.0, 2.5); min(w A, clip(w) A) = -2 * max(w, clip(w)) = (-1.6, -2, -5).
    want = torch.tensor([[1.2, 1.0, 0.4], [-1.6, -2.0, -5.0]], dtype=torch.float64)
    torch.testing.assert_close(out.advantages, want)
    _check_pg_gradient(out, student, mask)
    assert out.metrics["clip_fraction"].item() == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match="sequence_advantages"):
        rlsd_loss(student, teacher, seq_adv[:1], mask)


def test_ppo_ratio_clip():
    lp = torch.log(torch.tensor([[0.5, 0.5]], dtype=torch.float64)).requires_grad_()
    old = torch.log(torch.tensor([[0.25, 0.25]], dtype=torch.float64))  # ratio 2
    adv = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    loss = policy_gradient_loss(lp, adv, behaviour_logprobs=old, ratio_clip=0.2, reduction="sum")
    # A > 0: min(2, 1.2) = 1.2 (clipped, no gradient); A < 0: min(-2, -1.2) = -2 (unclipped).
    assert loss.item() == pytest.approx(-(1.2 - 2.0))
    (grad,) = torch.autograd.grad(loss, lp)
    torch.testing.assert_close(grad, torch.tensor([[0.0, 2.0]], dtype=torch.float64))


def test_all_masked_objectives_are_zero():
    student, teacher, _ = _logprobs()
    mask = torch.zeros_like(teacher, dtype=torch.bool)
    for out in (
        minillm_loss(student, teacher, mask),
        tinker_loss(student, teacher, mask, discount=0.5),
        gopd_loss(student, teacher, teacher, mask, lam=2.0),
        rlsd_loss(student, teacher, torch.ones(3, dtype=torch.float64), mask),
    ):
        (grad,) = torch.autograd.grad(out.loss, student)
        assert out.loss.item() == 0.0 and not grad.any() and not out.advantages.any()
