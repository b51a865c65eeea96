"""ULD distances and the hybrid KL + ULD loss on hand-computed distributions."""

from __future__ import annotations

import math

import pytest
import torch

from opd_megatron.losses.uld import cross_tokenizer_loss, hybrid_uld, shared_vocab, sorted_distance, uld


def _logits(*probs):
    return torch.tensor(probs, dtype=torch.float64).log()


def test_uld_hand_computed_with_vocab_padding():
    q = _logits([0.6, 0.4])  # student, V = 2
    p = _logits([0.2, 0.5, 0.3])  # teacher, W = 3: sorted 0.5 0.3 0.2 against 0.6 0.4 0 (padded)
    assert uld(q, p, metric="l1").item() == pytest.approx(0.1 + 0.1 + 0.2)
    assert uld(q, p, metric="w1").item() == pytest.approx(0.1 + 0.2 + 0.0)  # |cumsum| of 0.1 0.1 -0.2
    assert uld(p, p).item() == pytest.approx(0.0, abs=1e-12)
    # only the shape counts: permuting either vocabulary changes nothing
    assert uld(q.flip(-1), p[:, [2, 0, 1]]).item() == pytest.approx(0.4)
    assert sorted_distance(
        torch.tensor([[0.6, 0.4]]), torch.tensor([[0.5, 0.3, 0.2]])
    ).item() == pytest.approx(0.4)


def test_uld_temperature():
    q, p = torch.randn(4, 7, dtype=torch.float64), torch.randn(4, 11, dtype=torch.float64)
    for metric in ("l1", "w1"):
        assert torch.allclose(uld(q, p, temperature=2.0, metric=metric), uld(q / 2, p / 2, metric=metric))
    with pytest.raises(ValueError, match="temperature"):
        uld(q, p, temperature=0.0)
    with pytest.raises(ValueError, match="metric"):
        uld(q, p, metric="l2")


def test_hybrid_hand_computed():
    q = _logits([0.5, 0.3, 0.2])  # student vocab: a b c
    p = _logits([0.4, 0.3, 0.2, 0.1])  # teacher vocab: a x y z; only "a" is shared
    s_ids, t_ids = torch.tensor([0]), torch.tensor([0])
    kl = 0.4 * math.log(0.4 / 0.5) - 0.4 + 0.5  # generalised KL on the intersection
    rest = 0.1  # sorted rest: 0.3 0.2 0 0 against 0.3 0.2 0.1 0
    got = hybrid_uld(q, p, s_ids, t_ids, kl_weight=2.0, uld_weight=0.5)
    assert got.item() == pytest.approx(2 * kl + 0.5 * rest)
    # identical distributions over an identical vocabulary: zero on both terms
    ids = torch.arange(4)
    assert hybrid_uld(p, p, ids, ids).item() == pytest.approx(0.0, abs=1e-12)
    # a teacher zero on a shared token costs the student's mass there
    p0 = torch.tensor([[0.0, 1.0]], dtype=torch.float64).log()
    q0 = _logits([0.25, 0.75])
    assert hybrid_uld(q0, p0, torch.tensor([0]), torch.tensor([0]), uld_weight=0.0).item() == pytest.approx(
        0.25
    )


def test_gradients_reach_only_the_student():
    q = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    p = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
    aligned = torch.tensor([True, False, True, False, True])
    for loss in (
        uld(q, p).sum(),
        uld(q, p, metric="w1").sum(),
        hybrid_uld(q, p, torch.tensor([0, 2]), torch.tensor([1, 3])).sum(),
        cross_tokenizer_loss(q, p, aligned, torch.tensor([0, 2]), torch.tensor([1, 3])).sum(),
    ):
        q.grad = None
        loss.backward()
        assert p.grad is None
        assert q.grad is not None and torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0


def test_cross_tokenizer_loss_selects_per_position():
    q, p = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    s_ids, t_ids = torch.tensor([0, 1, 2]), torch.tensor([5, 6, 7])
    aligned = torch.tensor([True, False, False, True])
    got = cross_tokenizer_loss(q, p, aligned, s_ids, t_ids, temperature=1.5, kl_weight=0.7, uld_weight=0.3)
    hyb = hybrid_uld(q, p, s_ids, t_ids, temperature=1.5, kl_weight=0.7, uld_weight=0.3)
    full = 0.3 * uld(q, p, temperature=1.5)
    assert torch.allclose(got, torch.where(aligned, hyb, full))
    assert torch.allclose(cross_tokenizer_loss(q, p, aligned, temperature=1.5, uld_weight=0.3), full)


def test_shared_vocab_matches_bytes():
    from opd_megatron.tokenization.train_local import train_hf_bpe, train_tiktoken

    hf, tk = train_hf_bpe(), train_tiktoken()
    s_ids, t_ids = shared_vocab(hf, tk)
    assert len(s_ids) > 256  # all single bytes plus shared merges
    assert hf.token_bytes(s_ids.tolist()) == tk.token_bytes(t_ids.tolist())
    assert not set(s_ids.tolist()) & hf.special_ids and not set(t_ids.tolist()) & tk.special_ids
