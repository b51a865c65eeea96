"""The loss of one micro-batch: one objective object per kind of teacher target.

Every objective has ``loss(hidden_NH, weight_VH, mb) -> (loss_sum, metrics)``: the student's pre-lm-head
hidden states at the micro-batch's loss positions ``[N, H]`` (row-major, the order of the targets), its
output-layer shard, and the micro-batch (its ``target`` and per-token ``weights``). ``loss_sum`` is summed
over tokens (the step divides by the global token count); ``metrics`` are detached sums over the tokens:
``tokens``, ``kl_sum`` (the divergence, unweighted, so the logged KL means the same for every kind) and
``agree_sum`` (student and teacher top-1 agree).

- :class:`DenseObjective`: the fused vocab-parallel divergence against one co-located teacher (objectives
  ``divergence``, and ``opsd``, the same with OPSD's per-token clip).
- :class:`MixtureObjective`: the same against the teachers' per-token mixture (MOPD mixture routing).
- :class:`TopKObjective`: the sparse top-k divergence against a scoring service's top-k.
- :class:`CrossTokenizerObjective`: projected / shared-vocabulary KL and ULD against a teacher of
  another tokenizer; everything it needs travels with the target.
- :class:`SampledTokenObjective`: the policy-gradient objectives on the sampled tokens (tinker,
  MiniLLM, G-OPD, AOPD, RLSD), on ``[B, S]`` grids since they need each sequence's structure.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd_megatron.config import LossConfig
from opd_megatron.data.domains import verify
from opd_megatron.losses import (
    aopd_loss,
    distributed_topk,
    gather_logprobs,
    gopd_loss,
    minillm_loss,
    rlsd_loss,
    tinker_loss,
)
from opd_megatron.losses.target_losses import (
    cross_loss,
    dense_loss,
    fused_against,
    global_argmax,
    mixture_loss,
    teacher_side,
    topk_loss,
)
from opd_megatron.rollout.mismatch import truncated_importance_weights
from opd_megatron.targets import CrossTokenizerTargets, MixtureTargets, TeacherTargets, TopKTargets
from opd_megatron.train.batch import MicroBatch

METRIC_KEYS = ("tokens", "kl_sum", "agree_sum")


@dataclass
class Objective:
    """Shared settings: the loss config, the TP group (None for one rank) and the real vocabulary."""

    lc: LossConfig
    group: object
    vocab: int

    def loss(self, hidden_NH, weight_VH, mb: MicroBatch) -> tuple[torch.Tensor, dict]:
        loss, kl_sum, agree_sum = self.parts(hidden_NH, weight_VH, mb, mb.weights[mb.loss_positions])
        return loss, {"tokens": mb.loss_mask.sum(), "kl_sum": kl_sum, "agree_sum": agree_sum}

    def parts(self, hidden_NH, weight_VH, mb: MicroBatch, weights_N):
        raise NotImplementedError


class DenseObjective(Objective):
    """``sum_t w_t D(p_T(.|y<t) || q_S(.|y<t))`` over the full vocabulary, fused and vocab-parallel;
    under ``opsd`` each token's divergence is clipped at ``opsd_tau``."""

    def parts(self, hidden_NH, weight_VH, mb, weights_N):
        clip = self.lc.opsd_tau if self.lc.objective == "opsd" else None
        return dense_loss(hidden_NH, weight_VH, mb.target, weights_N, self.lc, self.group, self.vocab, clip)

    def per_token(self, hidden_NH, weight_VH, target: TeacherTargets | MixtureTargets) -> torch.Tensor:
        """The divergence per token ``[N]`` (detached), for evaluation."""
        teacher = teacher_side(target, self.lc, self.group, self.vocab)
        ones_N = torch.ones(hidden_NH.shape[0], device=hidden_NH.device)
        out = fused_against(hidden_NH, weight_VH, ones_N, self.lc, self.group, self.vocab, **teacher)
        return out.per_token.detach()


class MixtureObjective(DenseObjective):
    """The dense divergence against ``p_mix = sum_i w_i p_i`` (per-token weights ``w``)."""

    def parts(self, hidden_NH, weight_VH, mb, weights_N):
        t: MixtureTargets = mb.target
        return mixture_loss(
            hidden_NH, weight_VH, t.parts, t.weights_MN, weights_N, self.lc, self.group, self.vocab
        )


class TopKObjective(Objective):
    def parts(self, hidden_NH, weight_VH, mb, weights_N):
        return topk_loss(hidden_NH, weight_VH, mb.target, weights_N, self.lc, self.group, self.vocab)


class CrossTokenizerObjective(Objective):
    def parts(self, hidden_NH, weight_VH, mb, weights_N):
        t: CrossTokenizerTargets = mb.target
        return cross_loss(
            hidden_NH, weight_VH, t, weights_N, self.lc, self.group, self.vocab, t.teacher_vocab,
            t.shared_ids, t.projector,
        )  # fmt: skip


class SampledTokenObjective(Objective):
    """Policy-gradient objectives on the sampled tokens, with the per-token reward
    ``r_t = log p_T(y_t) - log q_S(y_t)`` (see :mod:`opd_megatron.losses.objectives` for each one's
    formula). RLSD's sequence signs come from the domain verifier (``decode`` turns ids into text)."""

    def __init__(self, lc: LossConfig, group, vocab: int, decode=None, tis_cap: float | None = None):
        super().__init__(lc, group, vocab)
        self.decode, self.tis_cap = decode, tis_cap

    def _logprobs(self, logits_NV, labels_N1) -> torch.Tensor:
        return gather_logprobs(logits_NV, labels_N1, self.group, self.lc.temperature, self.vocab).squeeze(-1)

    def loss(self, hidden_NH, weight_VH, mb: MicroBatch):
        lc, mask_BS = self.lc, mb.loss_positions
        grid = lambda v_N: torch.zeros(mask_BS.shape, dtype=v_N.dtype, device=v_N.device).masked_scatter(  # noqa: E731
            mask_BS, v_N
        )
        labels_N1 = mb.labels[mask_BS].unsqueeze(-1)
        s_logits_NV = hidden_NH.float() @ weight_VH.float().t()
        t_logits_NV = mb.target.logits_NV()
        s_lp, t_lp = (
            grid(self._logprobs(s_logits_NV, labels_N1)),
            grid(self._logprobs(t_logits_NV, labels_N1)),
        )
        mask, common = mb.loss_mask, {"reduction": "token_mean", "normaliser": 1.0}
        if self.tis_cap is not None and lc.objective != "tinker":
            # Truncated importance sampling: tokens weighted by min(pi / mu, C) against the rollout
            # engine's mismatch (tinker already importance-samples against the behaviour log-probs).
            mask = mask * truncated_importance_weights(s_lp, mb.behaviour, self.tis_cap, mask)
        if lc.objective == "tinker":
            out = tinker_loss(
                s_lp, t_lp, mask, discount=lc.discount, behaviour_logprobs=mb.behaviour, **common
            )
        elif lc.objective == "minillm":
            sampling = mb.behaviour if lc.mix_alpha > 0 else None
            out = minillm_loss(s_lp, t_lp, mask, sampling_logprobs=sampling, **common)
        elif lc.objective == "gopd":
            r_lp = grid(self._logprobs(mb.reference.logits_NV(), labels_N1))
            out = gopd_loss(s_lp, t_lp, r_lp, mask, lam=lc.gopd_lambda, discount=lc.discount, **common)
        elif lc.objective == "aopd":
            top = distributed_topk(t_logits_NV / lc.temperature, lc.aopd_topk, self.group, self.vocab)
            k = top.indices.shape[-1]
            grid_k = lambda v: torch.zeros(*mask_BS.shape, k, dtype=v.dtype).masked_scatter(  # noqa: E731
                mask_BS.unsqueeze(-1).expand(-1, -1, k), v
            )
            s_top = gather_logprobs(s_logits_NV, top.indices, self.group, lc.temperature, self.vocab)
            t_top = gather_logprobs(t_logits_NV, top.indices, self.group, lc.temperature, self.vocab)
            out = aopd_loss(s_lp, t_lp, grid_k(s_top), grid_k(t_top), mask, **common)
        elif lc.objective == "rlsd":
            out = rlsd_loss(s_lp, t_lp, self.signs(mb), mask, eps_w=lc.rlsd_eps, **common)
        else:  # the registry in config lists exactly these
            raise AssertionError(lc.objective)
        kl_sum = ((s_lp - t_lp).detach() * mask).sum()  # sampled-token reverse-KL estimate
        agree = (
            (
                global_argmax(s_logits_NV.detach(), self.group, self.vocab)
                == global_argmax(t_logits_NV, self.group, self.vocab)
            )
            .float()
            .sum()
        )
        return out.loss, {"tokens": mask.sum(), "kl_sum": kl_sum, "agree_sum": agree}

    def signs(self, mb: MicroBatch) -> torch.Tensor:
        """RLSD's sequence advantage ``[B]``: +1 where the verifier accepts the completion, else -1."""
        return torch.tensor([1.0 if verify(r, self.decode(c)) else -1.0 for r, c in zip(mb.rows, mb.comps)])


class Objectives:
    """Picks the objective of a micro-batch from its target's kind and the configured objective."""

    def __init__(self, lc: LossConfig, group, vocab: int, decode=None, tis_cap: float | None = None):
        self.dense = DenseObjective(lc, group, vocab)
        self.by_kind = {
            MixtureTargets: MixtureObjective(lc, group, vocab),
            TopKTargets: TopKObjective(lc, group, vocab),
            CrossTokenizerTargets: CrossTokenizerObjective(lc, group, vocab),
            TeacherTargets: self.dense if lc.objective in ("divergence", "opsd") else None,
        }
        if self.by_kind[TeacherTargets] is None:
            self.by_kind[TeacherTargets] = SampledTokenObjective(lc, group, vocab, decode, tis_cap)

    def for_target(self, target) -> Objective:
        return self.by_kind[type(target)]

    def loss(self, hidden_NH, weight_VH, mb: MicroBatch):
        return self.for_target(mb.target).loss(hidden_NH, weight_VH, mb)
