"""Rollout/trainer mismatch statistics and truncated importance weights: hand-computed cases, the KL
estimate against the exact KL of two categorical distributions, and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from opd_megatron.rollout.mismatch import logprob_mismatch, tis_enabled, truncated_importance_weights


def test_statistics_by_hand():
    trainer = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 9.0]])
    behaviour = torch.tensor([[-1.5, -2.0, -2.0], [-0.25, -0.5, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    s = logprob_mismatch(trainer, behaviour, mask)
    d = [0.5, 0.0, -1.0, -0.25]  # the masked-out 9.0 must not count
    assert s["tokens"] == 4
    assert s["logprob_diff_mean_abs"] == pytest.approx(sum(map(abs, d)) / 4)
    assert s["logprob_diff_max_abs"] == pytest.approx(1.0)
    assert s["logprob_diff_mean"] == pytest.approx(sum(d) / 4)
    assert s["kl_behaviour_trainer"] == pytest.approx(sum(math.expm1(x) - x for x in d) / 4)


def test_identical_logprobs_give_zero_and_empty_mask_gives_zero():
    lp = torch.randn(3, 5)
    s = logprob_mismatch(lp, lp.clone())
    assert s["logprob_diff_max_abs"] == 0 and s["kl_behaviour_trainer"] == 0 and s["tokens"] == 15
    s = logprob_mismatch(lp, lp + 1, torch.zeros(3, 5))
    assert s["tokens"] == 0 and s["kl_behaviour_trainer"] == 0


def test_kl_estimate_matches_exact_kl_of_sampled_tokens():
    g = torch.Generator().manual_seed(0)
    log_mu = torch.log_softmax(torch.randn(16, generator=g, dtype=torch.float64), -1)
    log_pi = torch.log_softmax(log_mu + 0.3 * torch.randn(16, generator=g, dtype=torch.float64), -1)
    exact = float((log_mu.exp() * (log_mu - log_pi)).sum())  # KL(mu || pi)
    y = torch.multinomial(log_mu.exp(), 200_000, replacement=True, generator=g)
    s = logprob_mismatch(log_pi[y], log_mu[y])
    assert s["kl_behaviour_trainer"] == pytest.approx(exact, rel=0.03)
    assert -s["logprob_diff_mean"] == pytest.approx(exact, rel=0.1)


def test_truncated_importance_weights():
    trainer = torch.tensor([0.0, math.log(3.0), math.log(0.5), 5.0], requires_grad=True)
    behaviour = torch.zeros(4)
    mask = torch.tensor([1, 1, 1, 0])
    w = truncated_importance_weights(trainer, behaviour, cap=2.0, mask=mask)
    assert torch.allclose(w, torch.tensor([1.0, 2.0, 0.5, 1.0]))
    assert not w.requires_grad  # a weight, not a path for gradients
    w = truncated_importance_weights(trainer, behaviour, cap=10.0)
    assert torch.allclose(w, torch.tensor([1.0, 3.0, 0.5, 10.0]))


def test_bad_input():
    with pytest.raises(ValueError, match="cap must be >= 1, got 0.5"):
        truncated_importance_weights(torch.zeros(2), torch.zeros(2), cap=0.5)
    with pytest.raises(ValueError, match=r"\(2, 3\) and behaviour log-probs \(2, 4\)"):
        logprob_mismatch(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="mask"):
        logprob_mismatch(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3))
    with pytest.raises(ValueError, match="not finite"):
        logprob_mismatch(torch.tensor([float("nan")]), torch.zeros(1))


def test_tis_enabled():
    assert not tis_enabled("auto", "divergence")
    assert tis_enabled("auto", "tinker") and tis_enabled("auto", "minillm")
    assert tis_enabled("on", "divergence") and not tis_enabled("off", "tinker")
    with pytest.raises(ValueError, match="rollout.tis"):
        tis_enabled("yes", "tinker")
