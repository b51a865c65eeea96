"""Reference divergences: textbook float64 formulas, hand-computed cases, endpoints, gradients, edges."""

from __future__ import annotations

import math

import pytest
import torch

from opd_megatron.losses import (
    check_divergence,
    divergence,
    divergence_from_logits,
    forward_kl,
    jsd,
    logprobs_from_logits,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    total_variation,
)
from tests.losses.conftest import DIVERGENCE_CASES, case_id


def _textbook(name: str, p: torch.Tensor, q: torch.Tensor, jsd_beta=0.5, skew_alpha=0.1) -> torch.Tensor:
    """Direct probability-space formulas (strictly positive p, q), float64."""

    def kl(a, b):
        return (a * torch.log(a / b)).sum(-1)

    if name == "forward_kl":
        return kl(p, q)
    if name == "reverse_kl":
        return kl(q, p)
    if name == "jsd":
        m = jsd_beta * p + (1 - jsd_beta) * q
        return jsd_beta * kl(p, m) + (1 - jsd_beta) * kl(q, m)
    if name == "skew_forward_kl":
        return kl(p, skew_alpha * p + (1 - skew_alpha) * q)
    if name == "skew_reverse_kl":
        return kl(q, skew_alpha * q + (1 - skew_alpha) * p)
    return 0.5 * (p - q).abs().sum(-1)


@pytest.mark.parametrize("case", DIVERGENCE_CASES, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_float64_textbook(case, dtype):
    name, kw = case
    t64 = torch.log_softmax(torch.randn(6, 4, 33, dtype=torch.float64) * 2, -1)
    s64 = torch.log_softmax(torch.randn(6, 4, 33, dtype=torch.float64) * 2, -1)
    want = _textbook(name, t64.exp(), s64.exp(), **kw)
    got = divergence(t64.to(dtype), s64.to(dtype), name, **kw)
    assert got.shape == (6, 4) and got.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


def test_survey_hand_computed_example():
    # p_T = (0.7, 0.2, 0.1), pi_theta = (0.3, 0.6, 0.1): KL(p_T || pi_theta) ~= 0.37 (the survey's example).
    p = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64).log()
    q = torch.tensor([0.3, 0.6, 0.1], dtype=torch.float64).log()
    fkl = 0.7 * math.log(0.7 / 0.3) + 0.2 * math.log(0.2 / 0.6)
    assert round(fkl, 2) == 0.37
    assert forward_kl(p, q).item() == pytest.approx(fkl, abs=1e-12)
    assert reverse_kl(p, q).item() == pytest.approx(
        0.3 * math.log(0.3 / 0.7) + 0.6 * math.log(0.6 / 0.2), abs=1e-12
    )
    assert total_variation(p, q).item() == pytest.approx(0.4, abs=1e-12)
    m = (0.5, 0.4, 0.1)  # (p + q) / 2
    js = 0.5 * sum(a * math.log(a / b) for a, b in zip((0.7, 0.2, 0.1), m))
    js += 0.5 * sum(a * math.log(a / b) for a, b in zip((0.3, 0.6, 0.1), m))
    assert jsd(p, q, 0.5).item() == pytest.approx(js, abs=1e-12)
    assert 0.0 < js < math.log(2)


def test_identical_distributions_give_zero():
    t = torch.log_softmax(torch.randn(5, 17, dtype=torch.float64), -1)
    for name, kw in DIVERGENCE_CASES:
        assert divergence(t, t.clone(), name, **kw).abs().max().item() < 1e-12, name


def test_jsd_beta_convention_and_endpoints():
    t = torch.log_softmax(torch.randn(4, 11, dtype=torch.float64), -1)
    s = torch.log_softmax(torch.randn(4, 11, dtype=torch.float64), -1)
    # beta = 0 is forward KL(T || S), beta = 1 is reverse KL(S || T): special-cased endpoints.
    torch.testing.assert_close(jsd(t, s, 0.0), forward_kl(t, s))
    torch.testing.assert_close(jsd(t, s, 1.0), reverse_kl(t, s))
    # The interior formula is not continuous there: it tends to 0 ...
    assert jsd(t, s, 1e-7).max().item() < 1e-5
    assert jsd(t, s, 1 - 1e-7).max().item() < 1e-5
    # ... while jsd / (beta (1 - beta)) tends to the KLs, as documented.
    for beta, end in ((1e-6, forward_kl(t, s)), (1 - 1e-6, reverse_kl(t, s))):
        torch.testing.assert_close(jsd(t, s, beta) / (beta * (1 - beta)), end, rtol=1e-4, atol=1e-6)
    # It matches TRL/Liger's generalised JSD at interior beta: beta KL(T||m) + (1-beta) KL(S||m).
    beta = 0.3
    log_m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log(1 - beta)]), 0)
    want = beta * (t.exp() * (t - log_m)).sum(-1) + (1 - beta) * (s.exp() * (s - log_m)).sum(-1)
    torch.testing.assert_close(jsd(t, s, beta), want)


def test_skew_kl_is_continuous_at_alpha_zero():
    t = torch.log_softmax(torch.randn(4, 11, dtype=torch.float64), -1)
    s = torch.log_softmax(torch.randn(4, 11, dtype=torch.float64), -1)
    torch.testing.assert_close(skew_forward_kl(t, s, 0.0), forward_kl(t, s))
    torch.testing.assert_close(skew_reverse_kl(t, s, 0.0), reverse_kl(t, s))
    torch.testing.assert_close(skew_forward_kl(t, s, 1e-9), forward_kl(t, s), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(skew_reverse_kl(t, s, 1e-9), reverse_kl(t, s), rtol=1e-6, atol=1e-8)
    # The mixture bounds the log-ratio: skew KL <= -log(alpha).
    t_far = torch.log_softmax(torch.tensor([[30.0, 0.0, 0.0]], dtype=torch.float64), -1)
    s_far = torch.log_softmax(torch.tensor([[0.0, 30.0, 0.0]], dtype=torch.float64), -1)
    assert skew_forward_kl(t_far, s_far, 0.1).item() <= -math.log(0.1) + 1e-9
    assert forward_kl(t_far, s_far).item() > 25


@pytest.mark.parametrize("case", DIVERGENCE_CASES, ids=case_id)
def test_gradcheck(case):
    name, kw = case
    teacher = torch.randn(3, 7, dtype=torch.float64)
    student = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)

    def f(z):
        return divergence(torch.log_softmax(teacher, -1), torch.log_softmax(z, -1), name, **kw)

    assert torch.autograd.gradcheck(f, (student,))


def test_temperature_and_t2_scaling():
    zt, zs = torch.randn(5, 13, dtype=torch.float64), torch.randn(5, 13, dtype=torch.float64)
    T = 2.5
    want = reverse_kl(torch.log_softmax(zt / T, -1), torch.log_softmax(zs / T, -1))
    got = divergence_from_logits(zt, zs, "reverse_kl", temperature=T, reduction="none")
    torch.testing.assert_close(got, want)
    scaled = divergence_from_logits(zt, zs, "reverse_kl", temperature=T, scale_by_t2=True, reduction="none")
    torch.testing.assert_close(scaled, want * T**2)


def test_padded_vocab_rows_are_excluded():
    zt, zs = torch.randn(4, 12, dtype=torch.float64), torch.randn(4, 12, dtype=torch.float64)
    zt[:, 10:] = 1e3  # garbage in the padding rows must not matter
    for name, kw in DIVERGENCE_CASES:
        got = divergence_from_logits(zt, zs, name, vocab_size=10, reduction="none", **kw)
        want = divergence_from_logits(zt[:, :10], zs[:, :10], name, reduction="none", **kw)
        torch.testing.assert_close(got, want, msg=name)
    lp = logprobs_from_logits(zs, vocab_size=10)
    assert torch.isneginf(lp[:, 10:]).all()


@pytest.mark.parametrize("case", DIVERGENCE_CASES, ids=case_id)
def test_extreme_logits_and_neg_inf_teacher_stay_finite(case):
    name, kw = case
    zs = torch.where(torch.rand(6, 20) > 0.5, 1e4, -1e4).requires_grad_()
    zt = torch.where(torch.rand(6, 20) > 0.5, 1e4, -1e4)
    # The teacher rules out some tokens the student does not want either (student logit -1e4), and
    # pads two rows both sides rule out.
    ruled_out = (torch.rand(6, 20) > 0.6) & (zs.detach() < 0)
    zt = zt.masked_fill(ruled_out, -torch.inf)
    zt[:, 0] = 1e4  # keep at least one teacher token
    loss = divergence_from_logits(zt, zs, name, vocab_size=18, **kw)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(zs.grad).all()


def test_reverse_kl_is_infinite_where_teacher_rules_out_student_mass():
    t = torch.tensor([[0.0, -torch.inf]], dtype=torch.float64)
    s = torch.log(torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    assert torch.isinf(reverse_kl(t, s)).all()
    assert torch.isfinite(forward_kl(t, s)).all() and torch.isfinite(skew_reverse_kl(t, s, 0.1)).all()


def test_bad_parameters_raise():
    with pytest.raises(ValueError, match="unknown divergence"):
        check_divergence("kl")
    with pytest.raises(ValueError, match="jsd_beta"):
        check_divergence("jsd", jsd_beta=1.5)
    with pytest.raises(ValueError, match="skew_alpha"):
        check_divergence("skew_forward_kl", skew_alpha=1.0)
    with pytest.raises(ValueError, match="temperature"):
        logprobs_from_logits(torch.zeros(2, 3), temperature=0.0)
