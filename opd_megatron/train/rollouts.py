"""The completions of one OPD step: the student's own samples and off-policy sequences.

GKD (survey, Sec. 3): a share ``lambda`` of each batch gets completions the student samples itself
(optionally from MiniLLM's teacher-mixed distribution ``alpha p_T + (1 - alpha) q_S``, each token weighted
by ``q_S / p_mix``); the rest gets off-policy completions, the row's reference or a teacher sample.
DistiLLM ramps ``lambda`` linearly from ``lambda_start``.
"""

from __future__ import annotations

from dataclasses import replace

from opd_megatron.config import ConfigError, LossConfig
from opd_megatron.data.domains import DOMAINS, verify
from opd_megatron.data.jsonl import PromptRow
from opd_megatron.rollout.sampler import MegatronSampler
from opd_megatron.rollout.types import SamplingParams
from opd_megatron.train.batch import OPDBatch


def lambda_at(step: int, cfg: LossConfig) -> float:
    """GKD's on-policy share for ``step``; the ``linear`` schedule ramps it DistiLLM-style."""
    if cfg.lambda_schedule == "constant":
        return cfg.on_policy_lambda
    frac = min(1.0, step / cfg.lambda_ramp_steps)
    return cfg.lambda_start + (cfg.on_policy_lambda - cfg.lambda_start) * frac


class RolloutSource:
    """Makes each step's :class:`OPDBatch`. ``sampler`` samples the student; ``teacher_model`` (the
    default teacher's model, or None) serves teacher-mixed sampling and teacher-sampled off-policy data,
    through a sampler built once."""

    def __init__(
        self,
        sampler: MegatronSampler,
        tokenizer,
        prompt_fn,
        lc: LossConfig,
        params: SamplingParams,
        seed: int,
    ):
        self.sampler, self.tokenizer, self.prompt_fn = sampler, tokenizer, prompt_fn
        self.lc, self.params, self.seed = lc, params, seed
        self.samples_per_prompt = 1
        self.teacher_model = None
        self._teacher_sampler: MegatronSampler | None = None

    def use_teacher(self, model, groups) -> None:
        """The default teacher's model, for teacher-mixed sampling and teacher-sampled off-policy data."""
        self.teacher_model = model
        if self.lc.on_policy_lambda < 1 and self.lc.off_policy_source == "teacher":
            end = self.prompt_fn.end_ids
            self._teacher_sampler = MegatronSampler(
                model,
                groups,
                eos_id=end[0],
                stop_ids=end[1:],
                pad_id=self.tokenizer.pad_id,
                tokenizer=self.tokenizer,
            )

    def step_params(self, step: int, dp_rank: int) -> SamplingParams:
        """This step's sampling parameters: a seed per step and data-parallel rank."""
        return replace(self.params, seed=self.seed * 1_000_003 + step * 131 + dp_rank)

    def make(self, step: int, rows: list[PromptRow], dp_rank: int) -> OPDBatch:
        prompts = [self.prompt_fn(r) for r in rows]
        lam = lambda_at(step, self.lc)
        n_on = round(lam * len(rows))
        params = self.step_params(step, dp_rank)
        comps, behaviour, weights, ended = [], [], [], None
        if n_on:
            mix = (self.teacher_model, self.lc.mix_alpha) if self.lc.mix_alpha > 0 else None
            ro = self.sampler.generate(prompts[:n_on], params, mix_with=mix)
            comps += ro.completion_ids
            behaviour += ro.logprobs
            weights += ro.importance_weights or [[1.0] * len(c) for c in ro.completion_ids]
            ended = sum(r == "eos" for r in ro.finish_reason) / n_on
        comps += self._off_policy(rows[n_on:], prompts[n_on:], params)
        pass_n = self.pass_counts(rows[:n_on], comps[:n_on])
        for c in comps[len(behaviour) :]:
            behaviour.append([0.0] * len(c))
            weights.append([1.0] * len(c))
        keep = [i for i, c in enumerate(comps) if c]
        pick = lambda xs: [xs[i] for i in keep]  # noqa: E731
        n_on_kept = sum(1 for i in keep if i < n_on)
        return OPDBatch(
            pick(rows), pick(prompts), pick(comps), pick(behaviour), pick(weights), lam, n_on_kept,
            empty=len(comps) - len(keep), pass_counts=pass_n, ended_fraction=ended,
        )  # fmt: skip

    def pass_counts(self, rows: list[PromptRow], comps: list[list[int]]) -> tuple[int, int]:
        """(groups with at least one verified sample, groups) over groups of ``samples_per_prompt``
        consecutive samples of one prompt, rows of verifiable domains only; (0, 0) with one sample per
        prompt."""
        n = self.samples_per_prompt
        if n == 1:
            return (0, 0)
        hits = [
            any(verify(rows[i], self.tokenizer.decode(c)) for c in comps[i : i + n])
            for i in range(0, len(rows) - n + 1, n)
            if rows[i].domain in DOMAINS
        ]
        return (sum(hits), len(hits))

    def _off_policy(self, rows: list[PromptRow], prompts: list[list[int]], params) -> list[list[int]]:
        if not rows:
            return []
        if self._teacher_sampler is not None:
            return self._teacher_sampler.generate(prompts, params).completion_ids
        out = []
        for r in rows:
            if r.reference is None:
                raise ConfigError("loss.off_policy_source", f"row {r.prompt!r} has no reference completion")
            # The reference ends the way SFT's targets and the samplers' completions end: at the
            # template's end-of-turn token (EOS without a template).
            out.append(self.tokenizer.encode(r.reference) + [self.prompt_fn.end_ids[0]])
        return out
