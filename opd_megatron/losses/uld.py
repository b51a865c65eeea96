r"""Universal Logit Distillation (ULD) distances for teachers with another vocabulary.

Where the student's and the teacher's tokenisations disagree there is no shared next-token event to put a
KL on, and the two vocabularies differ anyway. ULD (Boizard et al., 2024) compares only the *shape* of
the two distributions: sort each one's probabilities in decreasing order, pad the smaller vocabulary
with zeros, and take a distance between the sorted vectors:

    ULD_L1(p, q) = sum_i | q_(i) - p_(i) |                              (p_(i): i-th largest prob)
    ULD_W1(p, q) = sum_k | sum_{i <= k} (q_(i) - p_(i)) |              (Wasserstein-1 over ranks)

with ``p`` = teacher, ``q`` = student, both ``softmax(logits / T)``. The hybrid mode
(:func:`hybrid_uld`) keeps token identity where it exists: on the exact vocabulary intersection ``I``
(tokens spelling the same bytes in both vocabularies) a generalised KL, and ULD on the rest:

    H(p, q) = w_kl * sum_{v in I} [ p_v log(p_v / q_v) - p_v + q_v ]  +  w_uld * ULD(p|not I, q|not I)

The generalised (unnormalised) KL is >= 0 and 0 iff ``p_v = q_v`` on ``I``, so it also pulls the
student's total mass on ``I`` to the teacher's, without renormalising either side (renormalising would
hide a mass mismatch). Teacher tensors are detached: gradients reach only the student.
All functions return one value per token ``[T]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from opd_megatron.tokenization.base import Tokenizer

__all__ = [
    "PROJECTION_FLOOR",
    "ULD_METRICS",
    "cross_tokenizer_loss",
    "hybrid_uld",
    "projected_logprobs",
    "shared_vocab",
    "sorted_distance",
    "uld",
]

ULD_METRICS = ("l1", "w1")
PROJECTION_FLOOR = 1e-6
"""Probability mixed uniformly into a projected teacher distribution, so student tokens no teacher token
projects onto (byte-fallback pieces, say) get a large but finite reverse-KL penalty."""


def _check(metric: str, temperature: float) -> None:
    if metric not in ULD_METRICS:
        raise ValueError(f"ULD metric must be one of {ULD_METRICS}, got {metric!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def sorted_distance(
    student_probs_TV: torch.Tensor, teacher_probs_TW: torch.Tensor, metric: str = "l1"
) -> torch.Tensor:
    """Distance between probability vectors after sorting each in decreasing order and zero-padding the
    shorter one (``V != W`` allowed): the ULD formulas of the module docstring, per row ``[T]``."""
    _check(metric, 1.0)
    width = max(student_probs_TV.shape[-1], teacher_probs_TW.shape[-1])
    q_TN = F.pad(
        student_probs_TV.sort(dim=-1, descending=True).values, (0, width - student_probs_TV.shape[-1])
    )
    p_TN = F.pad(
        teacher_probs_TW.sort(dim=-1, descending=True).values, (0, width - teacher_probs_TW.shape[-1])
    )
    diff_TN = q_TN - p_TN
    if metric == "w1":
        diff_TN = diff_TN.cumsum(dim=-1)  # CDF difference over ranks
    return diff_TN.abs().sum(dim=-1)  # [T]


def _probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    # at least fp32 for the softmax (bf16 logits), float64 stays float64 (reference tests)
    return torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, dim=-1)


def uld(
    student_logits_TV: torch.Tensor,
    teacher_logits_TW: torch.Tensor,
    temperature: float = 1.0,
    metric: str = "l1",
) -> torch.Tensor:
    """ULD between student and teacher logits of different vocabularies, per token ``[T]``."""
    _check(metric, temperature)
    q_TV = _probs(student_logits_TV, temperature)
    p_TW = _probs(teacher_logits_TW.detach(), temperature)
    return sorted_distance(q_TV, p_TW, metric)


def hybrid_uld(
    student_logits_TV: torch.Tensor,
    teacher_logits_TW: torch.Tensor,
    shared_student_ids_K: torch.Tensor,
    shared_teacher_ids_K: torch.Tensor,
    temperature: float = 1.0,
    kl_weight: float = 1.0,
    uld_weight: float = 1.0,
    metric: str = "l1",
) -> torch.Tensor:
    """Generalised KL on the vocabulary intersection plus ULD on the rest (formula ``H`` in the module
    docstring), per token ``[T]``. ``shared_*_ids_K`` pair the ``K`` shared tokens (see
    :func:`shared_vocab`)."""
    _check(metric, temperature)
    q_TV = _probs(student_logits_TV, temperature)
    p_TW = _probs(teacher_logits_TW.detach(), temperature)
    q_TK, p_TK = q_TV[:, shared_student_ids_K], p_TW[:, shared_teacher_ids_K]
    # 0 log 0 = 0: a teacher zero contributes only the student's mass q_v
    log_ratio_TK = torch.where(p_TK > 0, p_TK.clamp_min(1e-38).log() - q_TK.clamp_min(1e-38).log(), 0.0)
    kl_T = (p_TK * log_ratio_TK - p_TK + q_TK).sum(dim=-1)  # [T]
    # ULD on the complements: zero the shared columns (zeros sort to the tail, like padding)
    q_rest_TV = q_TV.index_fill(-1, shared_student_ids_K, 0.0)
    p_rest_TW = p_TW.index_fill(-1, shared_teacher_ids_K, 0.0)
    return kl_weight * kl_T + uld_weight * sorted_distance(q_rest_TV, p_rest_TW, metric)


def shared_vocab(
    student_tok: Tokenizer, teacher_tok: Tokenizer, special_pairs: tuple[tuple[int, int], ...] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """Id pairs ``(student_ids_K, teacher_ids_K)`` of tokens spelling the same non-empty bytes in both
    vocabularies (special tokens excluded; where one side spells a string twice, the id its tokenizer
    produces, see :func:`~opd_megatron.tokenization.cross.canonical_token_ids`), plus
    ``special_pairs``: specials that mean the same event on both sides, above all the end of the
    completion (student EOS / end-of-turn <-> the teacher's). Without that pair the KL at the last
    position would push the student's mass *away* from every shared token, since the teacher's mass
    sits on a token outside the intersection."""
    from opd_megatron.tokenization.cross import canonical_token_ids

    t_index = canonical_token_ids(teacher_tok)
    pairs = [(i, t_index[b]) for b, i in canonical_token_ids(student_tok).items() if b in t_index]
    taken_s, taken_t = {p[0] for p in pairs}, {p[1] for p in pairs}
    pairs += [(a, b) for a, b in dict.fromkeys(special_pairs) if a not in taken_s and b not in taken_t]
    ids = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)
    return ids[:, 0], ids[:, 1]


def cross_tokenizer_loss(
    student_logits_TV: torch.Tensor,
    teacher_logits_TW: torch.Tensor,
    aligned_T: torch.Tensor,
    shared_student_ids_K: torch.Tensor | None = None,
    shared_teacher_ids_K: torch.Tensor | None = None,
    temperature: float = 1.0,
    kl_weight: float = 1.0,
    uld_weight: float = 1.0,
    metric: str = "l1",
) -> torch.Tensor:
    """Per-token loss ``[T]`` for rows already paired by an alignment (teacher row ``t`` is the one for
    student row ``t``): on aligned rows ``kl_weight`` x generalised KL on the shared vocabulary plus
    ``uld_weight`` x ULD on the rest (the hybrid ``H``); on unaligned rows ``uld_weight`` x ULD on the full
    distributions. Without shared ids every row gets plain ULD."""
    full_T = uld(student_logits_TV, teacher_logits_TW, temperature, metric)
    if shared_student_ids_K is None or shared_teacher_ids_K is None:
        return uld_weight * full_T
    hyb_T = hybrid_uld(
        student_logits_TV, teacher_logits_TW, shared_student_ids_K, shared_teacher_ids_K,
        temperature, kl_weight, uld_weight, metric,
    )  # fmt: skip
    return torch.where(aligned_T.bool(), hyb_T, uld_weight * full_T)


def projected_logprobs(
    teacher_logits_TW: torch.Tensor,
    projection_W: torch.Tensor,
    vocab: int,
    temperature: float = 1.0,
    return_mass: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""The teacher's next-token distribution moved onto the student's vocabulary, as log-probs ``[T, V]``:

    .. math:: \tilde p(v) = (1 - \epsilon) \frac{\sum_{w: \pi(w) = v} p_T(w)}{\sum_{w: \pi(w) \ge 0} p_T(w)}
              + \frac{\epsilon}{V}

    with ``projection_W`` = :math:`\pi` (see
    :func:`~opd_megatron.tokenization.cross.first_token_projection`; -1 drops a teacher token) and
    :math:`\epsilon` = :data:`PROJECTION_FLOOR`. Detached: gradients reach only the student. With
    ``return_mass`` also the teacher's mass on the tokens kept, ``[T]`` (the normaliser above)."""
    p_TW = _probs(teacher_logits_TW.detach(), temperature)
    keep_W = projection_W >= 0
    out_TV = p_TW.new_zeros(p_TW.shape[0], vocab).index_add_(1, projection_W[keep_W], p_TW[:, keep_W])
    mass_T = out_TV.sum(-1)
    out_TV = out_TV / mass_T.unsqueeze(-1).clamp_min(1e-30)
    lp_TV = torch.log((1 - PROJECTION_FLOOR) * out_TV + PROJECTION_FLOOR / vocab)
    return (lp_TV, mass_T) if return_mass else lp_TV
