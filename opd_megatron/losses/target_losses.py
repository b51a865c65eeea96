"""The distillation loss of one micro-batch, for each kind of teacher target.

Every function gets the student's pre-lm-head hidden states of the loss positions ``[N, H]`` (row-major,
the order of the teacher's targets), its output-layer shard, the per-token weights ``[N]`` and returns
``(loss_sum, per_token_sum, top1_agree_sum)``: the loss summed over tokens (the step divides by the
global token count) and two detached metric sums over the tokens of non-zero weight (unweighted, so the
logged KL means the same for every kind of target).

- dense targets (co-located teacher, same tokenizer): the fused vocab-parallel divergence; the full
  ``[N, V]`` logits never exist.
- mixture of dense targets (MOPD ``mixture`` routing): the same fused divergence against the teachers'
  weighted mixture ``p_mix = sum_i w_i p_i`` (weights per token), whose log-probs are formed shard by
  shard (one ``[N, V/tp]`` buffer per teacher).
- top-k targets (scoring service): :func:`~opd_megatron.losses.topk.topk_distillation_loss` on the
  student's logits shard.
- cross-tokeniser targets: KL on the shared vocabulary at boundary-aligned positions and ULD elsewhere
  (:func:`~opd_megatron.losses.uld.cross_tokenizer_loss`), on gathered full-vocabulary logits of both
  sides (the two vocabularies are not split alike).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from opd_megatron.config import LossConfig
from opd_megatron.losses.divergences import divergence
from opd_megatron.losses.fused_kl import fused_linear_divergence, loss_kwargs
from opd_megatron.losses.topk import topk_distillation_loss
from opd_megatron.losses.tp import global_logsumexp, vocab_range
from opd_megatron.losses.uld import cross_tokenizer_loss, projected_logprobs, uld
from opd_megatron.targets import CrossTokenizerTargets, MixtureTargets, TeacherTargets, TopKTargets

LossParts = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

MIN_PREFIX_MASS = 1e-3
"""Below this teacher mass on tokens consistent with the bytes already emitted, the projected target is
noise (the teacher did not expect the student's split) and the position falls back to ULD."""


def fused_against(hidden_NH, weight_VH, weights_N, lc: LossConfig, group, vocab, clip=None, **teacher):
    """The fused vocab-parallel divergence with ``lc``'s settings (its per-token values included);
    ``teacher`` is its teacher side, see :func:`teacher_side`."""
    return fused_linear_divergence(
        hidden_NH,
        weight_VH,
        **teacher,
        **loss_kwargs(lc),
        mask_T=weights_N,
        normaliser=1.0,
        tp_group=group,
        vocab_size=vocab,
        token_clip=clip,
    )


def _parts(out) -> LossParts:
    return out.loss, out.per_token.detach().sum(), out.top1_agree.float().sum()


def teacher_side(tgt: TeacherTargets | MixtureTargets, lc: LossConfig, group, vocab: int) -> dict:
    """The fused loss's teacher arguments for a dense target: the teacher's hidden states and output
    layer, or, for a mixture, the mixture's log-probs shard (scaled by T: the fused loss divides teacher
    logits by T again, so its softmax gives ``p_mix``)."""
    if isinstance(tgt, TeacherTargets):
        return {"teacher_hidden_TH": tgt.hidden_NH, "teacher_weight_VH": tgt.weight_VH}
    lp = [teacher_logprobs(t, group, vocab, lc.temperature) for t in tgt.parts]
    return {"teacher_logits_TV": mixture_logprobs(lp, tgt.weights_MN) * lc.temperature}


def dense_loss(hidden_NH, weight_VH, tgt: TeacherTargets, weights_N, lc: LossConfig, group, vocab, clip=None):
    """Fused divergence against one co-located teacher of the student's vocabulary."""
    teacher = teacher_side(tgt, lc, group, vocab)
    return _parts(fused_against(hidden_NH, weight_VH, weights_N, lc, group, vocab, clip, **teacher))


def teacher_logprobs(tgt: TeacherTargets, group, vocab: int, temperature: float = 1.0) -> torch.Tensor:
    """This rank's shard ``[N, V/tp]`` of ``log_softmax(z / T)`` of a dense teacher; padding columns -inf."""
    logits_NV = tgt.logits_NV() / temperature
    _, n_valid = vocab_range(logits_NV.shape[-1], group, vocab)
    logits_NV[:, n_valid:] = -torch.inf
    return logits_NV - global_logsumexp(logits_NV[:, :n_valid], group).unsqueeze(-1)


def mixture_logprobs(logprobs_MNV: list[torch.Tensor], weights_MN: torch.Tensor) -> torch.Tensor:
    """``log sum_i w_i p_i`` per vocabulary entry: the mixture's log-probs shard ``[N, V/tp]`` (already
    normalised when every ``p_i`` is and the weights of each token sum to one)."""
    stacked_MNV = torch.stack(logprobs_MNV)
    log_w_MN1 = torch.log(weights_MN.to(stacked_MNV.dtype)).unsqueeze(-1)
    return torch.logsumexp(stacked_MNV + log_w_MN1, dim=0)


def mixture_loss(hidden_NH, weight_VH, tgts: list[TeacherTargets], weights_MN, token_w_N, lc, group, vocab):
    """Fused divergence against the weighted mixture of several same-vocabulary teachers."""
    teacher = teacher_side(MixtureTargets(list(tgts), weights_MN), lc, group, vocab)
    return _parts(fused_against(hidden_NH, weight_VH, token_w_N, lc, group, vocab, **teacher))


def topk_loss(hidden_NH, weight_VH, tgt: TopKTargets, weights_N, lc: LossConfig, group, vocab) -> LossParts:
    """Sparse top-k divergence against a scoring service's top-k log-probs."""
    logits_NV = hidden_NH.float() @ weight_VH.float().t()
    out = topk_distillation_loss(
        logits_NV,
        tgt.topk_logprobs_NK,
        tgt.topk_ids_NK,
        mask=weights_N,
        normaliser=1.0,
        reduction="token_mean",
        divergence=lc.divergence,
        tail=lc.topk_tail,
        jsd_beta=lc.jsd_beta,
        skew_alpha=lc.skew_alpha,
        temperature=lc.temperature,
        scale_by_t2=lc.scale_by_t2,
        tp_group=group,
        vocab_size=vocab,
    )
    live_N = weights_N > 0  # metrics count tokens, unweighted, like the fused path
    per_token_N = torch.where(live_N, out.per_token / torch.where(live_N, weights_N, 1.0), 0.0)
    agree = (global_argmax(logits_NV.detach(), group, vocab) == tgt.topk_ids_NK[:, 0]) & live_N
    return out.loss, per_token_N.sum(), agree.float().sum()


def global_argmax(logits_NV, group, vocab) -> torch.Tensor:
    """Global argmax over a TP-split vocabulary (ties: the lowest id)."""
    start, n_valid = vocab_range(logits_NV.shape[-1], group, vocab)
    local = logits_NV[:, :n_valid]
    val_N, idx_N = local.max(dim=-1)
    if group is None or dist.get_world_size(group) == 1:
        return idx_N + start
    vals = [torch.empty_like(val_N) for _ in range(dist.get_world_size(group))]
    idxs = [torch.empty_like(idx_N) for _ in range(dist.get_world_size(group))]
    dist.all_gather(vals, val_N, group=group)
    dist.all_gather(idxs, idx_N + start, group=group)
    best = torch.stack(vals).argmax(dim=0)  # first rank wins ties: the lowest id
    return torch.stack(idxs).gather(0, best.unsqueeze(0)).squeeze(0)


def gather_vocab(logits_NV: torch.Tensor, group, vocab: int) -> torch.Tensor:
    """Full-vocabulary logits ``[N, vocab]`` from this rank's shard (differentiable: each rank's gradient
    is its own columns), padding columns dropped."""
    if group is not None and dist.get_world_size(group) > 1:
        from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

        logits_NV = gather_from_tensor_model_parallel_region(logits_NV, group)
    return logits_NV[:, :vocab]


def dense_teacher_logits(tgt: TopKTargets | TeacherTargets, group, vocab: int) -> torch.Tensor:
    """A teacher's full-vocabulary logits ``[N, vocab]``; top-k targets become log-probs that are -inf
    off the k tokens (ULD then sees the renormalised top-k: the tail was never sent)."""
    if isinstance(tgt, TopKTargets):
        out_NV = torch.full((tgt.topk_ids_NK.shape[0], vocab), -torch.inf, device=tgt.topk_ids_NK.device)
        return out_NV.scatter(1, tgt.topk_ids_NK, tgt.topk_logprobs_NK.float())
    with torch.no_grad():
        return gather_vocab(tgt.logits_NV(), group, vocab)


def cross_loss(
    hidden_NH,
    weight_VH,
    tgt: CrossTokenizerTargets,
    weights_N,
    lc: LossConfig,
    group,
    vocab: int,
    teacher_vocab: int,
    shared_ids: tuple[torch.Tensor, torch.Tensor] | None,
    projector=None,
) -> LossParts:
    """Cross-tokeniser loss per ``lc.cross_kl``: ``projected`` (with ``projector``, a
    :class:`~opd_megatron.tokenization.cross.PrefixProjector` or any ``prefix -> [W]`` map):
    ``lc.divergence`` against the teacher's distribution projected onto the student's next token, given
    the bytes of the teacher token already emitted; ULD where the teacher puts less than
    :data:`MIN_PREFIX_MASS` on tokens consistent with those bytes;
    ``shared``: generalised KL on the shared vocabulary where the tokenisations agree 1:1, ULD elsewhere.
    Student tokens without a teacher partner (index -1) get no loss."""
    student_NV = gather_vocab(hidden_NH.float() @ weight_VH.float().t(), group, vocab)
    teacher_UW = dense_teacher_logits(tgt.inner, group, teacher_vocab)
    has_N = tgt.teacher_index_N >= 0
    if not bool(has_N.any()):
        zero = student_NV.sum() * 0.0
        return zero, zero.detach(), zero.detach()
    teacher_NW = teacher_UW[tgt.teacher_index_N.clamp_min(0)]
    s_NV, t_NW, w_N = student_NV[has_N], teacher_NW[has_N], weights_N[has_N]
    agree = torch.zeros((), device=student_NV.device)
    if lc.cross_kl == "projected" and projector is not None:
        keep = has_N.nonzero().squeeze(1).tolist()
        prefixes = [tgt.prefix_N[i] for i in keep] if tgt.prefix_N is not None else [b""] * len(keep)
        t_lp_NV = torch.empty(len(keep), vocab, dtype=torch.float32, device=s_NV.device)
        mass_N = torch.empty(len(keep), dtype=torch.float32, device=s_NV.device)
        by_prefix: dict[bytes, list[int]] = {}
        for i, c in enumerate(prefixes):
            by_prefix.setdefault(c, []).append(i)
        for c, rows in by_prefix.items():
            rows_t = torch.tensor(rows, device=s_NV.device)
            lp, mass = projected_logprobs(
                t_NW[rows_t], projector(c).to(t_NW.device), vocab, lc.temperature, True
            )
            t_lp_NV[rows_t], mass_N[rows_t] = lp.float(), mass.float()
        ctx_N = mass_N >= MIN_PREFIX_MASS
        s_lp_NV = torch.log_softmax(s_NV / lc.temperature, dim=-1)
        kl_N = divergence(t_lp_NV, s_lp_NV, lc.divergence, jsd_beta=lc.jsd_beta, skew_alpha=lc.skew_alpha)
        uld_N = uld(s_NV, t_NW, lc.temperature, lc.uld_metric)
        per_token_N = torch.where(ctx_N, lc.cross_kl_weight * kl_N, lc.uld_weight * uld_N)
        live = ctx_N & (w_N > 0)
        agree = (t_lp_NV[live].argmax(-1) == s_NV[live].argmax(-1)).sum()
    else:
        s_ids, t_ids = shared_ids if shared_ids is not None else (None, None)
        per_token_N = cross_tokenizer_loss(
            s_NV, t_NW, tgt.aligned_N[has_N], s_ids, t_ids, temperature=lc.temperature,
            kl_weight=lc.cross_kl_weight, uld_weight=lc.uld_weight, metric=lc.uld_metric,
        )  # fmt: skip
        if s_ids is not None:  # top-1 agreement at aligned positions, through the shared vocabulary
            t2s = torch.full((teacher_vocab,), -1, dtype=torch.long, device=s_ids.device)
            t2s[t_ids] = s_ids
            al = tgt.aligned_N[has_N] & (w_N > 0)
            agree = (t2s[t_NW[al].argmax(-1)] == s_NV[al].argmax(-1)).sum()
    w_N = w_N.to(per_token_N.dtype)
    loss = (per_token_N * w_N).sum()
    # metrics count tokens, unweighted, like the fused path
    return loss, (per_token_N.detach() * (w_N > 0)).sum(), agree.float()
