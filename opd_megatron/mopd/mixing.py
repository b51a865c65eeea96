r"""Mixture weights, teacher confidence and teacher disagreement.

Mixture (survey, Appendix B): the KL target of a token is :math:`p_{mix} = \sum_i w_i p_i` with
:math:`\sum_i w_i = 1` per token. Weights are

- ``fixed``: the teachers' configured weights, normalised;
- ``per_prompt``: :math:`w_i(x) = \mathrm{softmax}_i(c_i(x) / \tau)` with :math:`c_i(x)` teacher i's mean
  log-prob of rollout x;
- ``per_token``: :math:`w_{i,t} = \mathrm{softmax}_i(\log p_i(y_t \mid y_{<t}) / \tau)`, the teacher that
  finds the sampled token likelier gets more say on that position.

Disagreement: the generalised Jensen-Shannon divergence of the teachers' distributions on the same
position, :math:`JS_w = H(\sum_i w_i p_i) - \sum_i w_i H(p_i)` (0 when they agree; at most
:math:`H(w) \le \log M`). A large value means averaging would flatten the target into a distribution no
teacher holds, which is the case for routing instead of mixing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from opd_megatron.losses.target_losses import mixture_logprobs, teacher_logprobs
from opd_megatron.losses.topk import gather_logprobs
from opd_megatron.losses.tp import all_reduce
from opd_megatron.targets import CrossTokenizerTargets, TeacherTargets, TopKTargets


def _entropy(logprobs_NV: torch.Tensor, group) -> torch.Tensor:
    """``-sum_v p log p`` per row of a TP-split log-prob shard (-inf entries contribute 0)."""
    plogp_NV = torch.where(torch.isfinite(logprobs_NV), logprobs_NV.exp() * logprobs_NV, 0.0)
    return all_reduce(-plogp_NV.sum(dim=-1), group)


@torch.no_grad()
def token_stats(targets, labels_N: torch.Tensor, group, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per scored token, the teacher's log-prob of the token in the sequence and its entropy ``([N], [N])``.

    Top-k targets give the entropy of the renormalised top-k (the tail was not sent). Cross-tokeniser
    targets give the stats over the teacher's own tokens (pass the teacher's completion ids)."""
    if isinstance(targets, CrossTokenizerTargets):
        targets = targets.inner
    if isinstance(targets, TopKTargets):
        lp_NK = torch.log_softmax(targets.topk_logprobs_NK.float(), dim=-1)
        return targets.token_logprobs_N.float(), -(lp_NK.exp() * lp_NK).sum(-1)
    if isinstance(targets, TeacherTargets):
        lp_N = gather_logprobs(targets.logits_NV(), labels_N.unsqueeze(-1), group, 1.0, vocab).squeeze(-1)
        return lp_N, _entropy(teacher_logprobs(targets, group, vocab), group)
    raise TypeError(f"no token statistics for {type(targets).__name__}")


def rollout_confidence(
    token_logprob_N: torch.Tensor,
    token_entropy_N: torch.Tensor,
    lengths: Sequence[int],
    norms: Sequence[float],
    criterion: str,
) -> list[float]:
    """One confidence score per rollout, higher is more confident: the rollout's summed log-prob
    (``logprob``) or minus its summed entropy (``entropy``), divided by ``norms`` (e.g. the completion's
    byte length: the same for every teacher whatever its tokenizer, so scores compare across teachers).
    Rollouts with no tokens or non-finite scores get -inf (never chosen over a real score)."""
    values_N = token_logprob_N if criterion == "logprob" else -token_entropy_N
    out, start = [], 0
    for n, norm in zip(lengths, norms):
        v = float(values_N[start : start + n].double().sum()) / max(norm, 1) if n else -math.inf
        out.append(v if math.isfinite(v) else -math.inf)
        start += n
    return out


def mixture_weights(
    mode: str,
    fixed: Sequence[float],
    lengths: Sequence[int],
    row_scores_MR: torch.Tensor | None = None,
    token_logprobs_MN: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token mixture weights ``[M, N]`` (``N = sum(lengths)``), each column summing to one."""
    m, n = len(fixed), int(sum(lengths))
    if mode == "fixed":
        w_M = torch.tensor(fixed, dtype=torch.float64)
        if not float(w_M.sum()) > 0:
            raise ValueError(f"fixed mixture weights must have a positive sum, got {list(fixed)}")
        return (w_M / w_M.sum()).unsqueeze(-1).expand(m, n).clone()
    if mode == "per_prompt":
        w_MR = torch.softmax(row_scores_MR.double() / temperature, dim=0)
        return w_MR.repeat_interleave(torch.tensor(list(lengths)), dim=1)
    if mode == "per_token":
        return torch.softmax(token_logprobs_MN.double() / temperature, dim=0)
    raise ValueError(f"mixture weights must be fixed, per_prompt or per_token, got {mode!r}")


@torch.no_grad()
def js_disagreement(
    targets: Sequence[TeacherTargets], weights_MN: torch.Tensor, group, vocab: int
) -> torch.Tensor:
    """Generalised JS divergence ``[N]`` between same-vocabulary teachers on the same tokens."""
    lp = [teacher_logprobs(t, group, vocab) for t in targets]
    mix_NV = mixture_logprobs(lp, weights_MN)
    each_MN = torch.stack([_entropy(x, group) for x in lp])
    return _entropy(mix_NV, group) - (weights_MN.to(each_MN.dtype) * each_MN).sum(0)
