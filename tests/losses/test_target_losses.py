"""Unit tests of the per-target distillation losses (dense, mixture, top-k, cross-tokeniser), single process."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from opd_megatron.config import LossConfig
from opd_megatron.losses.target_losses import (
    cross_loss,
    dense_loss,
    mixture_logprobs,
    mixture_loss,
    teacher_logprobs,
    topk_loss,
)
from opd_megatron.targets import CrossTokenizerTargets, TeacherTargets, TopKTargets

N, H, V = 6, 8, 10


def setup(seed: int = 0):
    """Student hidden/weight (hidden requires grad) and a teacher of the same vocabulary, float64."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.7
    teacher = TeacherTargets(
        hidden_NH=torch.randn(N, H, generator=g, dtype=torch.float64),
        weight_VH=torch.randn(V, H, generator=g, dtype=torch.float64),
    )
    return hidden, weight, teacher


def test_mixture_logprobs_is_normalised_and_equals_log_weighted_sum():
    torch.manual_seed(0)
    lp = [torch.log_softmax(torch.randn(N, V, dtype=torch.float64) * 2, dim=-1) for _ in range(3)]
    w_MN = torch.softmax(torch.randn(3, N, dtype=torch.float64), dim=0)
    mix = mixture_logprobs(lp, w_MN)
    assert_close(torch.logsumexp(mix, dim=-1), torch.zeros(N, dtype=torch.float64))
    direct = sum(w_MN[i].unsqueeze(-1) * lp[i].exp() for i in range(3)).log()
    assert_close(mix, direct)


def test_teacher_logprobs_masks_padding_columns():
    _, _, teacher = setup()
    lp = teacher_logprobs(teacher, None, V - 2, temperature=2.0)
    assert bool(torch.isinf(lp[:, V - 2 :]).all())
    expected = torch.log_softmax(teacher.logits_NV()[:, : V - 2] / 2.0, dim=-1)
    assert_close(lp[:, : V - 2], expected)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl"])
def test_mixture_loss_single_teacher_equals_dense_loss(divergence, temperature):
    hidden, weight, teacher = setup(1)
    lc = LossConfig(divergence=divergence, temperature=temperature)
    ones = torch.ones(N)
    dense = dense_loss(hidden, weight, teacher, ones, lc, None, V)
    mix = mixture_loss(hidden, weight, [teacher], torch.ones(1, N), ones, lc, None, V)
    assert float(dense[0].detach()) > 1e-3
    for a, b in zip(dense, mix):
        assert_close(a.double(), b.double(), atol=1e-5, rtol=0)


def test_mixture_loss_of_two_teachers_differs_from_each_teacher():
    hidden, weight, t1 = setup(2)
    _, _, t2 = setup(3)
    lc, ones = LossConfig(divergence="forward_kl"), torch.ones(N)
    w_MN = torch.full((2, N), 0.5)
    mix = float(mixture_loss(hidden, weight, [t1, t2], w_MN, ones, lc, None, V)[0].detach())
    d1 = float(dense_loss(hidden, weight, t1, ones, lc, None, V)[0].detach())
    d2 = float(dense_loss(hidden, weight, t2, ones, lc, None, V)[0].detach())
    # KL is jointly convex: KL(mix || q) < mean_i KL(p_i || q) for distinct teachers
    assert mix < 0.5 * (d1 + d2) - 1e-4


def test_mixture_loss_zero_weight_teacher_is_ignored():
    hidden, weight, t1 = setup(2)
    _, _, t2 = setup(3)
    lc, ones = LossConfig(divergence="reverse_kl"), torch.ones(N)
    w_MN = torch.stack([torch.ones(N), torch.zeros(N)])
    mix = mixture_loss(hidden, weight, [t1, t2], w_MN, ones, lc, None, V)[0]
    assert_close(
        mix.double(), dense_loss(hidden, weight, t1, ones, lc, None, V)[0].double(), atol=1e-5, rtol=0
    )


def cross_targets(teacher: TeacherTargets | TopKTargets, index_N: torch.Tensor, aligned_N: torch.Tensor):
    return CrossTokenizerTargets(
        inner=teacher,
        aligned_N=aligned_N,
        teacher_index_N=index_N,
        teacher_completion_ids=[list(range(index_N.numel()))],
        alignments=[],
    )


def test_cross_loss_same_vocabulary_equals_forward_kl_dense_loss():
    hidden, weight, teacher = setup(4)
    teacher.hidden_NH.requires_grad_(True)
    teacher.weight_VH.requires_grad_(True)
    ids = torch.arange(V)
    tgt = cross_targets(teacher, torch.arange(N), torch.ones(N, dtype=torch.bool))
    lc = LossConfig(divergence="forward_kl")
    loss, per_tok, _ = cross_loss(hidden, weight, tgt, torch.ones(N), lc, None, V, V, (ids, ids))
    student = hidden.detach().clone().requires_grad_(True)
    ref = dense_loss(student, weight, teacher, torch.ones(N), lc, None, V)
    assert float(ref[0].detach()) > 1e-3
    assert_close(loss.double(), ref[0].double(), atol=1e-5, rtol=0)
    assert_close(per_tok.double(), ref[1].double(), atol=1e-5, rtol=0)
    loss.backward()
    ref[0].backward()
    assert hidden.grad is not None and float(hidden.grad.abs().sum()) > 0
    assert_close(hidden.grad, student.grad, atol=1e-5, rtol=0)
    assert teacher.hidden_NH.grad is None and teacher.weight_VH.grad is None


def test_cross_loss_rows_without_teacher_partner_get_no_loss():
    hidden, weight, teacher = setup(5)
    index = torch.tensor([0, -1, 2, 3, -1, 5])
    aligned = torch.tensor([True, True, False, True, False, True])
    ids = torch.arange(V)
    lc = LossConfig(divergence="forward_kl")
    w = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0, 1.5])
    loss, per_tok, _ = cross_loss(
        hidden, weight, cross_targets(teacher, index, aligned), w, lc, None, V, V, (ids, ids)
    )
    keep = index >= 0
    h_kept = hidden.detach()[keep].clone().requires_grad_(True)
    ref, ref_tok, _ = cross_loss(
        h_kept,
        weight,
        cross_targets(teacher, index[keep], aligned[keep]),
        w[keep],
        lc,
        None,
        V,
        V,
        (ids, ids),
    )
    assert float(ref.detach()) > 1e-3
    assert_close(loss, ref)
    assert_close(per_tok, ref_tok)
    loss.backward()
    ref.backward()
    assert float(hidden.grad[~keep].abs().sum()) == 0.0
    assert_close(hidden.grad[keep], h_kept.grad)


def test_cross_loss_reads_teacher_rows_by_index_and_applies_token_weights():
    hidden, weight, teacher = setup(8)
    index = torch.tensor([5, 3, -1, 0, 0, 1])
    keep = index >= 0
    w = torch.tensor([1.0, 2.0, 4.0, 0.5, 1.0, 3.0])
    ids = torch.arange(V)
    lc = LossConfig(divergence="forward_kl")
    tgt = cross_targets(teacher, index, torch.ones(N, dtype=torch.bool))
    loss, _, _ = cross_loss(hidden, weight, tgt, w, lc, None, V, V, (ids, ids))
    picked = TeacherTargets(hidden_NH=teacher.hidden_NH[index[keep]], weight_VH=teacher.weight_VH)
    ref = dense_loss(hidden[keep], weight, picked, w[keep], lc, None, V)
    assert_close(loss.double(), ref[0].double(), atol=1e-5, rtol=0)


def test_cross_loss_all_rows_without_partner_is_zero_with_grad_path():
    hidden, weight, teacher = setup(6)
    tgt = cross_targets(teacher, torch.full((N,), -1), torch.zeros(N, dtype=torch.bool))
    loss, per_tok, agree = cross_loss(hidden, weight, tgt, torch.ones(N), LossConfig(), None, V, V, None)
    assert float(loss.detach()) == 0.0 and float(per_tok) == 0.0 and float(agree) == 0.0
    loss.backward()
    assert float(hidden.grad.abs().sum()) == 0.0


def test_topk_loss_full_k_renorm_equals_dense_forward_kl():
    hidden, weight, teacher = setup(7)
    logp = torch.log_softmax(teacher.logits_NV(), dim=-1)
    sorted_lp, sorted_ids = logp.sort(dim=-1, descending=True)
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(0))
    tgt = TopKTargets(
        topk_ids_NK=sorted_ids,
        topk_logprobs_NK=sorted_lp,
        token_logprobs_N=logp.gather(1, labels[:, None]).squeeze(1),
    )
    lc = LossConfig(divergence="forward_kl", topk_tail="renorm")
    # unit weights, and importance-style weights with a dropped token: the metrics count tokens alike
    for w in (torch.ones(N), torch.tensor([2.0, 0.5, 0.0, 1.0, 1.5, 0.25])[:N]):
        loss, per_tok, agree = topk_loss(hidden, weight, tgt, w, lc, None, V)
        ref = dense_loss(hidden, weight, teacher, w, lc, None, V)
        assert float(ref[0].detach()) > 1e-3
        assert_close(loss.double(), ref[0].double(), atol=1e-5, rtol=0)
        assert_close(per_tok.double(), ref[1].double(), atol=1e-5, rtol=0)
        assert_close(agree.double(), ref[2].double())


def test_cross_loss_with_a_remote_teachers_topk_targets():
    """A cross-tokeniser teacher behind a scoring service hands top-k targets: with k = V they carry the
    whole distribution and the loss equals the dense inner teacher's; with k < V the teacher's tail is
    dropped (renormalised top-k), which changes the value."""
    hidden, weight, teacher = setup(11)
    ids = torch.arange(V)
    logp = torch.log_softmax(teacher.logits_NV(), dim=-1)
    lp_sorted, id_sorted = logp.sort(dim=-1, descending=True)
    lc = LossConfig(divergence="forward_kl")
    aligned = torch.tensor([True, False, True, True, False, True])
    index = torch.arange(N)
    dense = cross_loss(
        hidden, weight, cross_targets(teacher, index, aligned), torch.ones(N), lc, None, V, V, (ids, ids)
    )
    for k, equal in ((V, True), (3, False)):
        topk = TopKTargets(id_sorted[:, :k], lp_sorted[:, :k], logp[:, 0])
        sparse = cross_loss(
            hidden, weight, cross_targets(topk, index, aligned), torch.ones(N), lc, None, V, V, (ids, ids)
        )
        got, want = float(sparse[0].detach()), float(dense[0].detach())
        assert torch.isfinite(sparse[0]) and (abs(got - want) < 1e-5) == equal, (k, got, want)
