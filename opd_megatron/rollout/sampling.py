"""Choosing the next token from vocabulary-parallel logits, without gathering ``[B, V]`` on any rank.

Each tensor-parallel rank holds the logits of its vocabulary shard, ``[B, V/tp]``. Every function here
reduces its shard to a few numbers per row, exchanges those with **one** all-gather of ``[B, k]`` per
rank, and finishes the choice identically on every rank (same gathered data, same generator state), so
all TP ranks return the same tokens:

* greedy: local (max, argmax, logsumexp) -> global argmax and log-probability;
* plain temperature sampling: Gumbel-max per shard. ``argmax_v (l_v / T + G_v)`` with i.i.d. Gumbel noise
  ``G_v`` is an exact sample of ``softmax(l / T)``; the max over shards of the per-shard maxima is the
  global one, so each rank perturbs its own shard with its own noise and only the (value, index) pairs
  meet;
* top-k / top-p: each rank's top-k' candidates are merged into the global top-k'; the filter and the
  draw act on that small candidate set;
* teacher-mixed sampling (MiniLLM): the mixture is sampled by first choosing the component, then
  Gumbel-max over that component's shard.

The global log-normaliser ``log sum_v exp(l_v / T)`` is the log-sum-exp of the per-rank log-sum-exps
(each rank's is stable on its own, so this equals an all-reduce of the max followed by one of the shifted
sum-exp), carried in the same all-gather. Gathered rows are float64 so vocabulary indices stay exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "VocabShard",
    "choose_filtered",
    "choose_greedy",
    "choose_gumbel",
    "choose_mixture",
    "gumbel_noise",
]


# torch >= 2.13 names the single-tensor all-gather all_gather_single; older releases only have the
# (since deprecated) all_gather_into_tensor.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice ``[start, start + size)`` of a vocabulary split across a TP group."""

    start: int
    size: int
    tp_group: dist.ProcessGroup | None
    tp_size: int

    def gather_rows(self, rows_BK: torch.Tensor) -> torch.Tensor:
        """All-gather ``[B, k]`` from every rank: ``[tp, B, k]`` (float64), in rank order."""
        rows_BK = rows_BK.to(torch.float64).contiguous()
        if self.tp_size == 1:
            return rows_BK.unsqueeze(0)
        # Ranks' rows are concatenated along the first dimension: [tp * B, k].
        out_XK = torch.empty(
            (self.tp_size * rows_BK.shape[0], *rows_BK.shape[1:]), dtype=rows_BK.dtype, device=rows_BK.device
        )
        _all_gather_single(out_XK, rows_BK, group=self.tp_group)
        return out_XK.view(self.tp_size, *rows_BK.shape)


def gumbel_noise(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard Gumbel noise shaped like ``like``: ``-log(-log U)`` with ``U ~ Uniform[0, 1)``.

    Two logs of uniforms cost a third of ``Tensor.exponential_`` on CPU, and this runs over the whole
    vocabulary shard at every step.
    """
    u = torch.rand(like.shape, generator=generator, dtype=like.dtype, device=like.device)
    # U = 0 would give -inf noise (never chosen) and the clamp makes it merely very unlikely; both are a
    # 2^-24 event and cannot give +inf, which would win the argmax whatever the logit.
    return u.clamp_min_(torch.finfo(like.dtype).tiny).log_().neg_().log_().neg_()


def _pick_rank(score_RB: torch.Tensor, *values_RB: torch.Tensor) -> list[torch.Tensor]:
    """For each row, the values of the rank with the highest score (the lowest rank on ties, which
    holds the lowest vocabulary index, as ``torch.argmax`` would choose)."""
    best_1B = score_RB.argmax(dim=0, keepdim=True)
    return [v.gather(0, best_1B).squeeze(0) for v in values_RB]


def choose_greedy(logits_BV: torch.Tensor, shard: VocabShard) -> tuple[torch.Tensor, torch.Tensor]:
    """Global argmax ``[B]`` and its unscaled log-probability ``log_softmax(logits)[argmax]`` ``[B]``.

    Padding rows of the vocabulary must already be ``-inf``.
    """
    logits_BV = logits_BV.float()
    max_B, idx_B = logits_BV.max(dim=-1)
    lse_B = torch.logsumexp(logits_BV, dim=-1)
    if shard.tp_size == 1:  # one shard: nothing to gather (same values as the gathered path)
        return idx_B + shard.start, max_B.double() - lse_B.double()
    local_B3 = torch.stack([max_B.double(), (idx_B + shard.start).double(), lse_B.double()], dim=-1)
    g_RB3 = shard.gather_rows(local_B3)
    val_B, tok_B = _pick_rank(g_RB3[..., 0], g_RB3[..., 0], g_RB3[..., 1])
    logprob_B = val_B - torch.logsumexp(g_RB3[..., 2], dim=0)  # [tp, B] -> [B]
    return tok_B.long(), logprob_B


def choose_gumbel(
    logits_BV: torch.Tensor, temperature: float, shard: VocabShard, shard_generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """An exact sample of ``softmax(logits / T)`` ``[B]`` and its log-probability ``[B]``.

    ``shard_generator`` must differ between TP ranks (each perturbs its own shard independently).
    """
    scaled_BV = logits_BV.float() / temperature if temperature != 1.0 else logits_BV.float()
    perturbed_BV = scaled_BV + gumbel_noise(scaled_BV, shard_generator)
    pert_B, idx_B = perturbed_BV.max(dim=-1)
    scaled_at_B = scaled_BV.gather(-1, idx_B.unsqueeze(-1)).squeeze(-1)
    lse_B = torch.logsumexp(scaled_BV, dim=-1)
    if shard.tp_size == 1:  # one shard: nothing to gather (same values as the gathered path)
        return idx_B + shard.start, scaled_at_B.double() - lse_B.double()
    local_B4 = torch.stack(
        [pert_B.double(), (idx_B + shard.start).double(), scaled_at_B.double(), lse_B.double()], dim=-1
    )
    g_RB4 = shard.gather_rows(local_B4)
    tok_B, scaled_tok_B = _pick_rank(g_RB4[..., 0], g_RB4[..., 1], g_RB4[..., 2])
    logprob_B = scaled_tok_B - torch.logsumexp(g_RB4[..., 3], dim=0)  # [tp, B] -> [B]
    return tok_B.long(), logprob_B


def choose_filtered(
    logits_BV: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    shard: VocabShard,
    shared_generator: torch.Generator | None,
    candidate_cap: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k / top-p sample ``[B]`` and its log-probability under the filtered, renormalised
    distribution ``[B]``.

    Each rank proposes its ``k' = min(K, V/tp)`` best tokens, where ``K = top_k`` when top-k is on and
    ``candidate_cap`` otherwise; the union holds the global top-``K``, which is kept. With top-k on this
    is exact, and top-p then acts on the top-k distribution renormalised (as vLLM and Hugging Face do).
    With top-p alone, the nucleus is taken over the global top-``candidate_cap`` tokens with their true
    probabilities (normalised over the full vocabulary): exact whenever those tokens hold at least
    ``top_p`` of the mass, otherwise the draw is restricted to them (as if ``top_k = candidate_cap``).

    ``shared_generator`` must be in the same state on every TP rank: all ranks draw the same token from
    the same candidates.
    """
    cap = top_k if top_k > 0 else candidate_cap
    k_local = min(cap, shard.size)
    scaled_BV = logits_BV.float() / temperature
    vals_BK, idx_BK = scaled_BV.topk(k_local, dim=-1)
    lse_B1 = torch.logsumexp(scaled_BV, dim=-1, keepdim=True)
    local = torch.cat([vals_BK.double(), (idx_BK + shard.start).double(), lse_B1.double()], dim=-1)
    g_RBX = shard.gather_rows(local)  # [tp, B, 2k' + 1]
    b = logits_BV.shape[0]
    cand_vals_BC = g_RBX[..., :k_local].permute(1, 0, 2).reshape(b, -1)
    cand_idx_BC = g_RBX[..., k_local : 2 * k_local].permute(1, 0, 2).reshape(b, -1)
    if shard.tp_size > 1:
        # The merged list is exact only for its first `cap` entries (a rank's (cap+1)-th token may beat
        # another rank's cap-th); keeping exactly those, sorted, makes it the global top-cap.
        cand_vals_BC, order_BC = cand_vals_BC.topk(min(cap, cand_vals_BC.shape[-1]), dim=-1)
        cand_idx_BC = cand_idx_BC.gather(-1, order_BC)
    if top_k > 0:
        log_norm_B = torch.logsumexp(cand_vals_BC, dim=-1)
    else:
        log_norm_B = torch.logsumexp(g_RBX[..., -1], dim=0)  # full-vocabulary normaliser, [tp, B] -> [B]
    if top_p < 1.0:
        probs_BC = (cand_vals_BC - log_norm_B.unsqueeze(-1)).exp()
        mass_before_BC = probs_BC.cumsum(dim=-1) - probs_BC
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the ones before it hold
        # less than top_p (so the most likely token always stays).
        cand_vals_BC = cand_vals_BC.masked_fill(mass_before_BC >= top_p, float("-inf"))
    log_kept_B = torch.logsumexp(cand_vals_BC, dim=-1)
    # Every rank holds all candidates, so an inverse-CDF draw (one uniform per row) is enough; dropped
    # tokens have zero width in the CDF and can never be chosen.
    cdf_BC = (cand_vals_BC - log_kept_B.unsqueeze(-1)).exp().cumsum(dim=-1)
    u_B1 = torch.rand(b, 1, generator=shared_generator, dtype=cdf_BC.dtype, device=cdf_BC.device)
    choice_B1 = torch.searchsorted(cdf_BC, u_B1 * cdf_BC[:, -1:], right=True).clamp_max_(cdf_BC.shape[-1] - 1)
    tok_B = cand_idx_BC.gather(-1, choice_B1).squeeze(-1)
    logprob_B = cand_vals_BC.gather(-1, choice_B1).squeeze(-1) - log_kept_B
    return tok_B.long(), logprob_B


def choose_mixture(
    student_BV: torch.Tensor,
    teacher_BV: torch.Tensor,
    temperature: float,
    alpha: float,
    shard: VocabShard,
    shard_generator: torch.Generator | None,
    shared_generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A sample of the MiniLLM mixture ``p_mix = alpha * p_T + (1 - alpha) * q_theta`` (both at
    temperature ``T``), its log-probability ``log p_mix(y)`` and its importance weight
    ``w = q_theta(y) / p_mix(y)``, each ``[B]``.

    Sampling a mixture exactly: draw the component ``z ~ Bernoulli(alpha)`` (shared generator, the same
    on every rank), then ``y`` from ``p_T`` if ``z`` else from ``q_theta`` by per-shard Gumbel-max. Each
    rank also sends both models' scaled logits at its local winner, so the winner's ``q_theta(y)`` and
    ``p_T(y)`` arrive with the same all-gather.
    """
    s_BV = student_BV.float() / temperature
    t_BV = teacher_BV.float() / temperature
    b = s_BV.shape[0]
    from_teacher_B1 = (torch.rand(b, 1, generator=shared_generator, device=s_BV.device) < alpha).expand(
        -1, s_BV.shape[-1]
    )
    source_BV = torch.where(from_teacher_B1, t_BV, s_BV)
    pert_B, idx_B = (source_BV + gumbel_noise(source_BV, shard_generator)).max(dim=-1)
    s_at_B = s_BV.gather(-1, idx_B.unsqueeze(-1)).squeeze(-1)
    t_at_B = t_BV.gather(-1, idx_B.unsqueeze(-1)).squeeze(-1)
    local_B6 = torch.stack(
        [
            pert_B.double(),
            (idx_B + shard.start).double(),
            s_at_B.double(),
            t_at_B.double(),
            torch.logsumexp(s_BV, dim=-1).double(),
            torch.logsumexp(t_BV, dim=-1).double(),
        ],
        dim=-1,
    )
    g_RB6 = shard.gather_rows(local_B6)
    tok_B, s_tok_B, t_tok_B = _pick_rank(g_RB6[..., 0], g_RB6[..., 1], g_RB6[..., 2], g_RB6[..., 3])
    log_q_B = s_tok_B - torch.logsumexp(g_RB6[..., 4], dim=0)
    log_t_B = t_tok_B - torch.logsumexp(g_RB6[..., 5], dim=0)
    log_alpha = math.log(alpha) if alpha > 0 else float("-inf")
    log_1m_alpha = math.log1p(-alpha) if alpha < 1 else float("-inf")
    log_mix_B = torch.logaddexp(log_t_B + log_alpha, log_q_B + log_1m_alpha)
    return tok_B.long(), log_mix_B, (log_q_B - log_mix_B).exp()
