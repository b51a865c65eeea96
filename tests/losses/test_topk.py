"""Sparse top-k path: distributed top-k, gathered student log-probs, tail handling, TP=2."""

from __future__ import annotations

import math

import pytest
import torch

from opd_megatron.losses import (
    distributed_topk,
    divergence,
    gather_logprobs,
    topk_distillation_loss,
    topk_divergence,
)
from tests.losses.conftest import DIVERGENCE_CASES, case_id, init_gloo


@pytest.mark.parametrize("tail", ["renorm", "rest"])
@pytest.mark.parametrize("case", DIVERGENCE_CASES, ids=case_id)
def test_k_equals_vocab_gives_the_full_divergence(case, tail):
    name, kw = case
    t = torch.log_softmax(torch.randn(5, 19, dtype=torch.float64) * 2, -1)
    s = torch.log_softmax(torch.randn(5, 19, dtype=torch.float64) * 2, -1)
    top = distributed_topk(t, 19)
    got = topk_divergence(t.gather(-1, top.indices), s.gather(-1, top.indices), name, tail, **kw)
    torch.testing.assert_close(got.per_token, divergence(t, s, name, **kw), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(got.teacher_mass, torch.ones(5, dtype=torch.float64))


def test_tails_by_hand():
    p, q = (0.5, 0.3, 0.2), (0.2, 0.2, 0.6)
    t_k = torch.tensor(p[:2], dtype=torch.float64).log()
    s_k = torch.tensor(q[:2], dtype=torch.float64).log()
    # rest: three buckets (0.5, 0.3, 0.2) vs (0.2, 0.2, 0.6), here exactly the full KL.
    rest = topk_divergence(t_k, s_k, "forward_kl", "rest")
    assert rest.per_token.item() == pytest.approx(sum(a * math.log(a / b) for a, b in zip(p, q)), abs=1e-12)
    assert rest.teacher_mass.item() == pytest.approx(0.8)
    # renorm: (5/8, 3/8) vs (1/2, 1/2).
    renorm = topk_divergence(t_k, s_k, "forward_kl", "renorm")
    assert renorm.per_token.item() == pytest.approx(
        5 / 8 * math.log(5 / 4) + 3 / 8 * math.log(3 / 4), abs=1e-12
    )
    with pytest.raises(ValueError, match="tail"):
        topk_divergence(t_k, s_k, "forward_kl", "drop")


def test_single_process_topk_and_gather():
    x = torch.randn(4, 6, 30)
    top = distributed_topk(x, 5, vocab_size=27)
    want = x[..., :27].topk(5, dim=-1)
    assert torch.equal(top.values, want.values) and torch.equal(top.indices, want.indices)
    lp = gather_logprobs(x, top.indices, temperature=2.0, vocab_size=27)
    torch.testing.assert_close(lp, torch.log_softmax(x[..., :27] / 2.0, -1).gather(-1, top.indices))
    with pytest.raises(ValueError, match="k must be"):
        distributed_topk(x, 28, vocab_size=27)


@pytest.mark.parametrize("tail", ["renorm", "rest"])
def test_gradcheck_through_gather(tail):
    logits = torch.randn(3, 10, dtype=torch.float64, requires_grad=True)
    t = torch.log_softmax(torch.randn(3, 10, dtype=torch.float64), -1)
    top = distributed_topk(t, 4)
    mask = torch.tensor([True, False, True])

    def f(z):
        return topk_distillation_loss(
            z, t.gather(-1, top.indices), top.indices, mask=mask, tail=tail, divergence="jsd", temperature=1.5
        ).loss

    assert torch.autograd.gradcheck(f, (logits,))


def test_loss_masks_and_reports_teacher_mass():
    logits = torch.randn(2, 5, 16)
    t = torch.log_softmax(torch.randn(2, 5, 16) * 3, -1)
    top = distributed_topk(t, 3)
    mask = torch.rand(2, 5) > 0.5
    out = topk_distillation_loss(logits, t.gather(-1, top.indices), top.indices, mask=mask, tail="rest")
    s = torch.log_softmax(logits, -1).gather(-1, top.indices)
    ref = topk_divergence(t.gather(-1, top.indices), s, "forward_kl", "rest")
    torch.testing.assert_close(out.per_token, torch.where(mask, ref.per_token, 0))
    torch.testing.assert_close(out.loss, ref.per_token[mask].mean())
    torch.testing.assert_close(out.teacher_mass, t.exp().topk(3, -1).values.sum(-1))


# ----------------------------------------------------------------------------------------------------
# TP = 2 on gloo
# ----------------------------------------------------------------------------------------------------


def _full_inputs():
    g = torch.Generator().manual_seed(7)
    return torch.randn(6, 64, generator=g, dtype=torch.float64), torch.randn(
        6, 64, generator=g, dtype=torch.float64
    )


def topk_tp2_worker(rank: int):
    group = init_gloo()
    teacher, student = _full_inputs()
    shard = slice(rank * 32, (rank + 1) * 32)
    out = {}
    for k, vocab_size in ((5, None), (40, None), (10, 50), (48, 50)):
        top = distributed_topk(teacher[:, shard], k, group, vocab_size)
        out[f"topk{k}-{vocab_size}"] = (top.values, top.indices)
    z = student[:, shard].clone().requires_grad_()
    top = distributed_topk(teacher[:, shard], 12, group, 50)
    t_lp = gather_logprobs(teacher[:, shard], top.indices, group, 1.3, 50)
    res = topk_distillation_loss(
        z,
        t_lp,
        top.indices,
        tail="rest",
        divergence="reverse_kl",
        temperature=1.3,
        tp_group=group,
        vocab_size=50,
    )
    res.loss.backward()
    out["loss"] = (res.loss.detach(), z.grad)
    return out


@pytest.fixture(scope="module")
def topk_tp2(tp2):
    return [rank["topk"] for rank in tp2]


def test_tp2_distributed_topk_equals_torch_topk(topk_tp2):
    teacher, _ = _full_inputs()
    for key in ("topk5-None", "topk40-None", "topk10-50", "topk48-50"):
        k, vocab = key.removeprefix("topk").split("-")
        V = 64 if vocab == "None" else int(vocab)
        want = teacher[:, :V].topk(int(k), dim=-1)
        for rank_out in topk_tp2:
            values, indices = rank_out[key]
            assert torch.equal(values, want.values) and torch.equal(indices, want.indices), key


def test_tp2_gathered_student_logprobs_and_loss(topk_tp2):
    teacher, student = _full_inputs()
    z = student.clone().requires_grad_()
    top = teacher[:, :50].topk(12, dim=-1)
    t_lp = torch.log_softmax(teacher[:, :50] / 1.3, -1).gather(-1, top.indices)
    s_lp = torch.log_softmax(z[:, :50] / 1.3, -1).gather(-1, top.indices)
    loss = topk_divergence(t_lp, s_lp, "reverse_kl", "rest").per_token.mean()
    loss.backward()
    for rank, rank_out in enumerate(topk_tp2):
        got_loss, got_grad = rank_out["loss"]
        torch.testing.assert_close(got_loss, loss.detach())
        torch.testing.assert_close(got_grad, z.grad[:, rank * 32 : (rank + 1) * 32])
