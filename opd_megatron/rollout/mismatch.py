"""Rollout/trainer mismatch: how far the engine's behaviour log-probs are from the trainer's, and the
truncated importance-sampling (TIS) correction for objectives that use the sampled token.

An inference engine (vLLM) and the trainer compute the same model with different kernels, batching and
precision, so the probability ``mu(y_t)`` with which the engine sampled a token differs slightly from the
trainer's ``pi(y_t)``. Both are known at every completion position: ``mu`` as the rollout's behaviour
log-probs, ``pi`` from the trainer's own forward pass.

Statistics (per step, over the masked positions, ``d_t = log pi(y_t) - log mu(y_t)``):

* ``mean |d_t|`` and ``max |d_t|``;
* the per-token KL estimate ``KL(mu || pi) ~ mean(exp(d_t) - 1 - d_t)`` (the non-negative "k3"
  estimator: unbiased for ``KL(mu || pi)`` when ``y_t ~ mu``, each term >= 0);
* ``mean d_t`` (the "k1" estimate of ``-KL(mu || pi)``, signed) for drift direction.

TIS (off-policy correction for the sampled-token objectives: a policy-gradient term computed on
tokens from ``mu`` while optimising ``pi`` is weighted by ``rho_t = pi(y_t) / mu(y_t)``; truncation
bounds its variance):

    w_t = min(exp(log pi(y_t) - log mu(y_t)), C)      (detached; C = the cap)

The full-distribution divergences sum over the whole vocabulary at each position and do not use the
sampled token's probability, so no weight applies to them (the positions themselves are still sampled
from ``mu``; TIS is off by default there).
"""

from __future__ import annotations

import torch

from opd_megatron.distributed.pipeline import broadcast_from_last_stage
from opd_megatron.losses import gather_logprobs

__all__ = ["logprob_mismatch", "truncated_importance_weights", "tis_enabled"]


def _check(trainer_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, mask: torch.Tensor | None):
    if trainer_logprobs.shape != behaviour_logprobs.shape:
        raise ValueError(
            f"trainer log-probs {tuple(trainer_logprobs.shape)} and behaviour log-probs "
            f"{tuple(behaviour_logprobs.shape)} must have the same shape"
        )
    if mask is not None and mask.shape != trainer_logprobs.shape:
        raise ValueError(
            f"mask {tuple(mask.shape)} must have the log-probs' shape {tuple(trainer_logprobs.shape)}"
        )


@torch.no_grad()
def logprob_mismatch(
    trainer_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, mask: torch.Tensor | None = None
) -> dict[str, float]:
    """Mismatch statistics over positions where ``mask`` is 1 (all positions without a mask); see the
    module docstring. Shapes: any, the same for all three (e.g. ``[B, S]``). Returns floats:
    ``logprob_diff_mean_abs``, ``logprob_diff_max_abs``, ``logprob_diff_mean``, ``kl_behaviour_trainer``
    and ``tokens``. No position gives zeros."""
    _check(trainer_logprobs, behaviour_logprobs, mask)
    d = trainer_logprobs.double() - behaviour_logprobs.double()
    if mask is not None:
        d = d[mask.bool()]
    else:
        d = d.reshape(-1)
    n = d.numel()
    if n == 0:
        zero = {"logprob_diff_mean_abs": 0.0, "logprob_diff_max_abs": 0.0, "logprob_diff_mean": 0.0}
        return {**zero, "kl_behaviour_trainer": 0.0, "tokens": 0.0}
    if not torch.isfinite(d).all():
        raise ValueError("log-probs are not finite at some masked position (NaN or inf)")
    k3 = torch.expm1(d) - d  # >= 0 elementwise
    return {
        "logprob_diff_mean_abs": float(d.abs().mean()),
        "logprob_diff_max_abs": float(d.abs().max()),
        "logprob_diff_mean": float(d.mean()),
        "kl_behaviour_trainer": float(k3.mean()),
        "tokens": float(n),
    }


def truncated_importance_weights(
    trainer_logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    cap: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``w_t = min(exp(log pi(y_t) - log mu(y_t)), cap)``, detached; 1 where ``mask`` is 0.

    Multiply a sampled-token loss term by ``w_t`` (e.g. ``-w_t * A_t * log pi(y_t)``). ``cap`` must be
    >= 1 (a cap below 1 would down-weight tokens the engine and trainer agree on)."""
    if not cap >= 1.0:
        raise ValueError(f"the importance-weight cap must be >= 1, got {cap}")
    _check(trainer_logprobs, behaviour_logprobs, mask)
    log_ratio = (trainer_logprobs.detach() - behaviour_logprobs.detach()).float()
    w = torch.exp(log_ratio).clamp(max=cap)
    if mask is not None:
        w = torch.where(mask.bool(), w, torch.ones_like(w))
    return w


def tis_enabled(mode: str, objective: str) -> bool:
    """Whether TIS applies: ``mode`` is ``rollout.tis`` (``auto``, ``on``, ``off``); ``auto`` turns it
    on for the sampled-token objectives and off for the full-distribution ``divergence``."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"rollout.tis must be 'auto', 'on' or 'off', got {mode!r}")
    if mode == "auto":
        return objective != "divergence"
    return mode == "on"


MISMATCH_KEYS = ("logprob_diff_mean_abs", "logprob_diff_max_abs", "logprob_diff_mean", "kl_behaviour_trainer")


@torch.no_grad()
def engine_mismatch(scorer, mbs, groups, temperature: float, vocab: int) -> dict[str, float]:
    """How far the engine's behaviour log-probs are from the trainer's own (``scorer``: the student as a
    scorer) on a step's sampled tokens (``rollout/logprob_diff_*``, ``rollout/kl_behaviour_trainer``); the
    same on every rank."""
    sums, parts = None, []
    for mb in mbs:
        s = scorer.score(mb.rows, mb.prompts, mb.comps)
        if s is None:  # not the last pipeline stage
            continue
        labels_N1 = mb.labels[mb.loss_positions].unsqueeze(-1)
        lp_N = gather_logprobs(s.logits_NV(), labels_N1, groups.tp_group_or_none, temperature, vocab)
        parts.append((lp_N.squeeze(-1), mb.behaviour[mb.loss_positions]))
    if parts:
        trainer_N, behaviour_N = (torch.cat(x) for x in zip(*parts))
        stats = logprob_mismatch(trainer_N.double(), behaviour_N.double())
        sums = torch.tensor([stats[k] for k in MISMATCH_KEYS], dtype=torch.float64, device=groups.device)
    values = broadcast_from_last_stage(sums, (len(MISMATCH_KEYS),), torch.float64, groups).tolist()
    return {f"rollout/{k}": v for k, v in zip(MISMATCH_KEYS, values)}
