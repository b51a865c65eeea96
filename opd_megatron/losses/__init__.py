"""Distillation losses.

- :mod:`~opd_megatron.losses.divergences`: reference divergences on full log-prob tensors (ground truth).
- :mod:`~opd_megatron.losses.fused_kl`: fused linear vocab-parallel divergence (the training path).
- :mod:`~opd_megatron.losses.compiled_block`: the fused loss's row block as one compiled function (CPU).
- :mod:`~opd_megatron.losses.topk`: sparse top-k path for teachers that return top-k log-probs.
- :mod:`~opd_megatron.losses.objectives`: token-level OPD objectives on sampled tokens.
- :mod:`~opd_megatron.losses.reduce`: masks and reductions shared by all of them.

Process groups are always passed in (``tp_group``, ``group``); ``None`` means a single process.
"""

from opd_megatron.losses.divergences import (
    DIVERGENCES,
    check_divergence,
    divergence,
    divergence_from_logits,
    forward_kl,
    jsd,
    logprobs_from_logits,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    total_variation,
)
from opd_megatron.losses.fused_kl import (
    FusedDivergenceOutput,
    FusedLinearDivergence,
    auto_chunk_size,
    fused_linear_divergence,
    loss_kwargs,
)
from opd_megatron.losses.objectives import (
    ObjectiveOutput,
    aopd_loss,
    discounted_suffix_sum,
    gopd_loss,
    minillm_loss,
    opsd_loss,
    policy_gradient_loss,
    rlsd_loss,
    tinker_loss,
)
from opd_megatron.losses.reduce import REDUCTIONS, global_token_count, masked_reduce, reduction_weights
from opd_megatron.losses.topk import (
    TAILS,
    TopK,
    TopKDivergence,
    TopKLossOutput,
    distributed_topk,
    gather_logprobs,
    topk_distillation_loss,
    topk_divergence,
)

__all__ = [
    "DIVERGENCES",
    "REDUCTIONS",
    "TAILS",
    "FusedDivergenceOutput",
    "FusedLinearDivergence",
    "ObjectiveOutput",
    "TopK",
    "TopKDivergence",
    "TopKLossOutput",
    "aopd_loss",
    "auto_chunk_size",
    "check_divergence",
    "discounted_suffix_sum",
    "distributed_topk",
    "divergence",
    "divergence_from_logits",
    "forward_kl",
    "fused_linear_divergence",
    "gather_logprobs",
    "global_token_count",
    "gopd_loss",
    "jsd",
    "logprobs_from_logits",
    "loss_kwargs",
    "masked_reduce",
    "minillm_loss",
    "opsd_loss",
    "policy_gradient_loss",
    "reduction_weights",
    "reverse_kl",
    "rlsd_loss",
    "skew_forward_kl",
    "skew_reverse_kl",
    "tinker_loss",
    "topk_distillation_loss",
    "topk_divergence",
    "total_variation",
]
