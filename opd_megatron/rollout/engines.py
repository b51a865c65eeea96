"""Choose the rollout engine of a run (``rollout.engine``) and keep it in step with the trainer.

The training loop needs two calls: :func:`build_sampler` once (before the first step; an engine that
cannot start stops the run here) and :func:`after_optimizer_step` after every optimizer step (a vLLM
engine is refitted with the new weights and reports what that cost; the Megatron sampler samples from
the trainer's own parameters and needs nothing).
"""

from __future__ import annotations

from collections.abc import Sequence

from opd_megatron.config import ConfigError, RunConfig
from opd_megatron.distributed import ParallelGroups
from opd_megatron.rollout.sampler import MegatronSampler
from opd_megatron.rollout.types import Sampler

__all__ = ["after_optimizer_step", "build_sampler"]


def build_sampler(
    cfg: RunConfig, model, groups: ParallelGroups, tokenizer, end_ids: Sequence[int] | None = None
) -> Sampler:
    """The student's sampler for ``cfg.rollout.engine`` (collective over the model's TP x PP group).
    Completions end at any of ``end_ids`` (default: the tokenizer's EOS; under a chat template its
    end-of-turn token and EOS, :func:`~opd_megatron.data.render.completion_end_ids`)."""
    rc = cfg.rollout
    end = tuple(end_ids) if end_ids else (tokenizer.eos_id,)
    kwargs = {"eos_id": end[0], "stop_ids": end[1:], "pad_id": tokenizer.pad_id, "tokenizer": tokenizer}
    if rc.engine == "megatron":
        return MegatronSampler(model, groups, lean_decode=rc.lean_decode, **kwargs)
    if cfg.loss.mix_alpha > 0:
        raise ConfigError(
            "rollout.engine",
            "vllm cannot sample from the teacher mixture of loss.mix_alpha > 0 (MiniLLM); use megatron",
        )
    from opd_megatron.rollout.vllm_engine import VLLMEngine

    return VLLMEngine(
        model,
        cfg.model,
        groups,
        kv_cache_bytes=int(rc.vllm_kv_cache_mb * 2**20),
        max_batch_size=rc.vllm_max_num_seqs,
        seed=cfg.train.seed,
        placement=rc.vllm_placement,
        devices=rc.vllm_devices,
        **kwargs,
    )


def after_optimizer_step(sampler: Sampler, model) -> dict[str, float]:
    """Bring the sampler up to date with ``model``'s new weights; returns metrics to log this step
    (``rollout/refit_*`` for a vLLM engine, nothing for the Megatron sampler)."""
    refit = getattr(sampler, "refit", None)
    if refit is None:
        return {}
    return refit(model).metrics()
