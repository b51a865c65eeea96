"""Vocabulary-parallel sampling maths, in one process.

TP=2 is simulated with two threads that exchange their ``[B, k]`` rows through a barrier, so the merge
logic runs exactly as on two ranks without starting processes.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import pytest
import torch

from opd_megatron.rollout.sampling import (
    VocabShard,
    choose_filtered,
    choose_greedy,
    choose_gumbel,
    choose_mixture,
)


def _close(actual, expected, atol=2e-6):
    """Logits are fp32, so log-probs agree with float64 references to ~1e-6."""
    torch.testing.assert_close(actual.double(), expected.double(), rtol=1e-5, atol=atol)


def _full(vocab: int) -> VocabShard:
    return VocabShard(start=0, size=vocab, tp_group=None, tp_size=1)


@dataclass
class _Exchange:
    """The all-gather of two threads."""

    parts: dict = field(default_factory=dict)
    barrier: threading.Barrier = field(default_factory=lambda: threading.Barrier(2))


@dataclass(frozen=True)
class _ThreadShard(VocabShard):
    rank: int = 0
    exchange: _Exchange | None = None

    def gather_rows(self, rows_BK):
        self.exchange.parts[self.rank] = rows_BK.double()
        self.exchange.barrier.wait()
        out = torch.stack([self.exchange.parts[r] for r in range(self.tp_size)])
        self.exchange.barrier.wait()  # nobody overwrites a part before both have read it
        return out


def _run_tp2(fn, logits_BV: torch.Tensor, *args_per_rank):
    """Run ``fn(logits_shard, shard, *args)`` on two threads, each with half the vocabulary."""
    half = logits_BV.shape[-1] // 2
    ex = _Exchange()
    out: dict[int, object] = {}

    def worker(rank):
        shard = _ThreadShard(start=rank * half, size=half, tp_group=None, tp_size=2, rank=rank, exchange=ex)
        out[rank] = fn(logits_BV[:, rank * half : (rank + 1) * half], shard, *args_per_rank[rank])

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return out[0], out[1]


def _logits(b=6, v=10, seed=0, scale=2.0):
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * scale


def test_greedy_is_argmax_with_unscaled_logprob():
    logits = _logits()
    tok, lp = choose_greedy(logits, _full(10))
    assert torch.equal(tok, logits.argmax(-1))
    ref = torch.log_softmax(logits.double(), -1).gather(-1, tok[:, None]).squeeze(-1)
    _close(lp, ref)


def test_greedy_tp2_equals_tp1_and_padding_rows_never_win():
    logits = _logits(v=12)
    logits[:, 10:] = float("-inf")  # padding rows of the vocabulary, all on rank 1
    (t0, lp0), (t1, lp1) = _run_tp2(lambda x, s: choose_greedy(x, s), logits, (), ())
    tok, lp = choose_greedy(logits, _full(12))
    assert torch.equal(t0, tok) and torch.equal(t1, tok)
    _close(lp0, lp)
    _close(lp1, lp)


def test_gumbel_samples_follow_softmax_at_temperature():
    v, n, temp = 5, 40_000, 0.7
    base = torch.tensor([1.0, 0.5, 0.0, -1.0, 2.0])
    logits = base.expand(n, v)
    tok, lp = choose_gumbel(logits, temp, _full(v), torch.Generator().manual_seed(0))
    probs = torch.softmax(base / temp, -1)
    freq = torch.bincount(tok, minlength=v).double() / n
    # Binomial standard error is at most 0.0025 here; 4 sigma.
    assert (freq - probs.double()).abs().max() < 0.01
    _close(lp, probs.log().double()[tok])


def test_gumbel_tp2_is_valid_with_exact_logprobs():
    logits = _logits(b=200, v=12)
    logits[:, 11] = float("-inf")
    gens = (torch.Generator().manual_seed(1),), (torch.Generator().manual_seed(2),)
    (t0, lp0), (t1, lp1) = _run_tp2(lambda x, s, g: choose_gumbel(x, 0.5, s, g), logits, *gens)
    assert torch.equal(t0, t1) and torch.equal(lp0, lp1)  # both ranks agree
    assert int(t0.max()) < 11
    ref = torch.log_softmax(logits.double() / 0.5, -1).gather(-1, t0[:, None]).squeeze(-1)
    _close(lp0, ref)


def test_top_k_samples_only_top_k_with_renormalised_logprobs():
    v, n = 8, 20_000
    base = torch.tensor([0.0, 3.0, 1.0, 2.5, -1.0, 2.0, 0.5, -2.0])
    tok, lp = choose_filtered(
        base.expand(n, v), 1.0, 3, 1.0, _full(v), torch.Generator().manual_seed(0), 1024
    )
    top3 = {1, 3, 5}
    assert set(tok.tolist()) == top3
    kept = torch.softmax(base[[1, 3, 5]].double(), -1)
    freq = torch.bincount(tok, minlength=v).double()[[1, 3, 5]] / n
    assert (freq - kept).abs().max() < 0.015
    _close(lp, torch.log(kept)[torch.tensor([0, 0, 0, 1, 0, 2, 0, 0])[tok]])


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4000, 4)
    tok, lp = choose_filtered(logits, 1.0, 0, 0.7, _full(4), torch.Generator().manual_seed(0), 1024)
    assert set(tok.tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
    expect = torch.tensor([math.log(0.5 / 0.8), math.log(0.3 / 0.8)], dtype=torch.float64)
    _close(lp, expect[tok])
    tok, _ = choose_filtered(logits, 1.0, 0, 1e-6, _full(4), torch.Generator().manual_seed(0), 1024)
    assert set(tok.tolist()) == {0}


@pytest.mark.parametrize(
    ("top_k", "top_p", "cap"), [(3, 1.0, 1024), (4, 0.6, 1024), (0, 0.8, 1024), (0, 0.9, 2)]
)
def test_filtered_tp2_draws_the_same_token_as_tp1(top_k, top_p, cap):
    """The merged per-rank candidates are the global top-k; with the same shared generator TP=2 draws
    exactly what TP=1 draws. The cap case checks that a rank's extra candidates are dropped: with cap 2
    rank 0 may hold the three best tokens, and only the global top 2 may stay."""
    logits = _logits(b=64, v=12, seed=5)
    logits[:4, :3] += 10.0  # rows whose best tokens all sit on rank 0
    gens = [(torch.Generator().manual_seed(9),) for _ in range(2)]

    def fn(x, s, g):
        return choose_filtered(x, 0.8, top_k, top_p, s, g, cap)

    (t0, lp0), (t1, lp1) = _run_tp2(fn, logits, *gens)
    tok, lp = choose_filtered(logits, 0.8, top_k, top_p, _full(12), torch.Generator().manual_seed(9), cap)
    assert torch.equal(t0, tok) and torch.equal(t1, tok)
    _close(lp0, lp)
    _close(lp1, lp)


def test_mixture_weights_and_logprobs():
    v, n, temp = 6, 30_000, 0.9
    s = torch.tensor([1.0, 0.0, -1.0, 0.5, 2.0, -0.5])
    t = torch.tensor([-1.0, 2.0, 0.0, 1.0, -0.5, 0.3])
    q, p = torch.softmax(s.double() / temp, -1), torch.softmax(t.double() / temp, -1)
    for alpha in (0.0, 0.3, 1.0):
        tok, lp, w = choose_mixture(
            s.expand(n, v),
            t.expand(n, v),
            temp,
            alpha,
            _full(v),
            torch.Generator().manual_seed(1),
            torch.Generator().manual_seed(2),
        )
        mix = alpha * p + (1 - alpha) * q
        _close(lp, mix.log()[tok])
        _close(w, (q / mix)[tok])
        freq = torch.bincount(tok, minlength=v).double() / n
        assert (freq - mix).abs().max() < 0.012
    assert torch.equal(
        choose_mixture(s[None], t[None], 1.0, 0.0, _full(v), None, None)[2],
        torch.ones(1, dtype=torch.float64),
    )
