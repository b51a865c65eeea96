"""Unit tests of MOPD mixture weights, teacher confidence statistics and JS disagreement."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from opd_megatron.mopd.mixing import js_disagreement, mixture_weights, rollout_confidence, token_stats
from opd_megatron.teachers.base import TeacherTargets, TopKTargets


def targets_from_logits(logits_NV: torch.Tensor) -> TeacherTargets:
    """Teacher targets whose ``logits_NV()`` are exactly ``logits_NV`` (identity output layer)."""
    v = logits_NV.shape[-1]
    return TeacherTargets(hidden_NH=logits_NV.clone(), weight_VH=torch.eye(v, dtype=logits_NV.dtype))


def entropy(p: list[float]) -> float:
    return -sum(x * math.log(x) for x in p if x > 0)


# ---------------------------------------------------------------- mixture_weights


def test_fixed_weights_are_normalised_and_columns_sum_to_one():
    w = mixture_weights("fixed", [1.0, 3.0], lengths=[2, 3])
    assert w.shape == (2, 5)
    assert_close(w.sum(0), torch.ones(5, dtype=w.dtype))
    assert_close(w[:, 0], torch.tensor([0.25, 0.75], dtype=w.dtype))
    assert_close(w, w[:, :1].expand(2, 5))


def test_per_prompt_weights_constant_within_rollout_and_softmax_of_scores():
    scores_MR = torch.tensor([[-1.0, -4.0, 0.5], [-2.0, -1.0, 0.5], [-3.0, -0.5, 0.0]])
    lengths, tau = [2, 1, 3], 0.7
    w = mixture_weights("per_prompt", [1.0, 1.0, 1.0], lengths, row_scores_MR=scores_MR, temperature=tau)
    assert w.shape == (3, 6)
    assert_close(w.sum(0), torch.ones(6, dtype=w.dtype))
    expected_MR = torch.softmax(scores_MR.double() / tau, dim=0)
    cols = [0, 0, 1, 2, 2, 2]
    for j, r in enumerate(cols):
        assert_close(w[:, j], expected_MR[:, r])
    assert not torch.allclose(w[:, 0], w[:, 2])


def test_per_token_weights_are_softmax_of_token_logprobs():
    torch.manual_seed(0)
    lp_MN = -torch.rand(2, 5) * 4
    w = mixture_weights("per_token", [1.0, 1.0], [3, 2], token_logprobs_MN=lp_MN, temperature=2.0)
    assert w.shape == (2, 5)
    assert_close(w.sum(0), torch.ones(5, dtype=w.dtype))
    p_MN = lp_MN.double().exp() ** 0.5  # softmax(lp / 2) = p^(1/2) normalised over teachers
    assert_close(w, p_MN / p_MN.sum(0))


def test_mixture_weights_bad_mode_raises():
    with pytest.raises(ValueError, match="per_batch"):
        mixture_weights("per_batch", [1.0, 1.0], [2])


def test_mixture_weights_zero_fixed_weights_raise():
    with pytest.raises(ValueError):
        mixture_weights("fixed", [0.0, 0.0], [2])


# ---------------------------------------------------------------- js_disagreement


def test_js_identical_teachers_is_zero():
    torch.manual_seed(1)
    logits = torch.randn(4, 6)
    w = mixture_weights("fixed", [0.3, 0.7], [4])
    js = js_disagreement([targets_from_logits(logits), targets_from_logits(logits)], w, None, 6)
    assert_close(js, torch.zeros(4, dtype=js.dtype), atol=1e-6, rtol=0)


def test_js_two_teachers_matches_hand_computation():
    p1 = [0.7, 0.2, 0.1, 0.0 + 1e-12]
    p2 = [0.1, 0.3, 0.4, 0.2]
    rows1 = torch.tensor([p1, p1], dtype=torch.float64).log()
    rows2 = torch.tensor([p2, p2], dtype=torch.float64).log()
    weights = [(0.5, 0.5), (0.25, 0.75)]
    w_MN = torch.tensor(weights, dtype=torch.float64).t()
    js = js_disagreement([targets_from_logits(rows1), targets_from_logits(rows2)], w_MN, None, 4)
    for n, (a, b) in enumerate(weights):
        mix = [a * x + b * y for x, y in zip(p1, p2)]
        expected = entropy(mix) - a * entropy(p1) - b * entropy(p2)
        assert abs(float(js[n]) - expected) < 1e-5
    assert float(js[0]) > 0.05


def test_js_is_bounded_by_log_m_and_approaches_it_for_disjoint_teachers():
    v = 5
    far = [targets_from_logits(torch.eye(v)[i : i + 1] * 40.0) for i in range(3)]
    w = mixture_weights("fixed", [1.0, 1.0, 1.0], [1])
    js = js_disagreement(far, w, None, v)
    assert abs(float(js[0]) - math.log(3)) < 1e-4
    torch.manual_seed(2)
    rand = [targets_from_logits(torch.randn(8, v) * 3) for _ in range(3)]
    w = torch.softmax(torch.randn(3, 8), dim=0)
    js = js_disagreement(rand, w, None, v)
    assert bool((js >= -1e-6).all()) and bool((js <= math.log(3) + 1e-6).all())
    assert float(js.max()) > 1e-3


# ---------------------------------------------------------------- token_stats


def test_token_stats_dense_targets():
    torch.manual_seed(3)
    logits = torch.randn(5, 7)
    labels = torch.tensor([0, 6, 3, 3, 1])
    lp_N, ent_N = token_stats(targets_from_logits(logits), labels, None, 7)
    logp = torch.log_softmax(logits, dim=-1)
    assert_close(lp_N, logp.gather(1, labels[:, None]).squeeze(1))
    assert_close(ent_N, -(logp.exp() * logp).sum(-1))


def test_token_stats_dense_targets_ignore_padding_columns():
    torch.manual_seed(4)
    logits = torch.randn(3, 6)
    labels = torch.tensor([0, 2, 4])
    lp_N, ent_N = token_stats(targets_from_logits(logits), labels, None, 5)
    logp = torch.log_softmax(logits[:, :5], dim=-1)
    assert_close(lp_N, logp.gather(1, labels[:, None]).squeeze(1))
    assert_close(ent_N, -(logp.exp() * logp).sum(-1))


def test_token_stats_topk_targets():
    topk_lp = torch.tensor(
        [[math.log(0.5), math.log(0.2), math.log(0.1)], [math.log(0.9), math.log(0.05), -9.0]]
    )
    tgt = TopKTargets(
        topk_ids_NK=torch.tensor([[3, 1, 0], [2, 0, 1]]),
        topk_logprobs_NK=topk_lp,
        token_logprobs_N=torch.tensor([-0.7, -2.5]),
    )
    lp_N, ent_N = token_stats(tgt, torch.tensor([3, 5]), None, 8)
    assert_close(lp_N, torch.tensor([-0.7, -2.5]))
    row0 = [0.5 / 0.8, 0.2 / 0.8, 0.1 / 0.8]
    assert abs(float(ent_N[0]) - entropy(row0)) < 1e-6
    p1 = [0.9, 0.05, math.exp(-9.0)]
    assert abs(float(ent_N[1]) - entropy([x / sum(p1) for x in p1])) < 1e-6


def test_token_stats_rejects_unknown_targets():
    with pytest.raises(TypeError):
        token_stats(object(), torch.zeros(1, dtype=torch.long), None, 4)


# ---------------------------------------------------------------- rollout_confidence


def test_rollout_confidence_logprob_sums_divided_by_norms():
    lp = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.5, -0.25])
    ent = torch.zeros(6)
    out = rollout_confidence(lp, ent, lengths=[2, 3, 1], norms=[4.0, 2.0, 1.0], criterion="logprob")
    assert out == pytest.approx([-3.0 / 4, -5.0 / 2, -0.25])


def test_rollout_confidence_empty_rollout_is_minus_inf():
    lp = torch.tensor([-1.0, -2.0, -4.0])
    out = rollout_confidence(
        lp, torch.zeros(3), lengths=[2, 0, 1], norms=[1.0, 5.0, 2.0], criterion="logprob"
    )
    assert out[0] == pytest.approx(-3.0) and out[1] == -math.inf and out[2] == pytest.approx(-2.0)


def test_rollout_confidence_non_finite_score_is_minus_inf():
    lp = torch.tensor([-1.0, float("nan"), -math.inf, -1.0])
    out = rollout_confidence(lp, torch.zeros(4), [2, 1, 1], [1.0, 1.0, 1.0], "logprob")
    assert out == [-math.inf, -math.inf, -1.0]


def test_rollout_confidence_entropy_criterion_is_minus_entropy():
    lp = torch.tensor([-9.0, -9.0, -9.0])
    ent = torch.tensor([0.5, 1.5, 2.0])
    out = rollout_confidence(lp, ent, lengths=[2, 1], norms=[2.0, 4.0], criterion="entropy")
    assert out == pytest.approx([-1.0, -0.5])
