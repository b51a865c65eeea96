"""Held-out evaluation: exact match, pass@k, and the reverse KL OPD minimises, measured where the student
goes.

- :func:`exact_match`: greedy completions checked by each domain's verifier.
- :meth:`OPDEvaluator.pass_at_k`: ``k`` samples per prompt at the rollout temperature, correct if any is.
- :meth:`OPDEvaluator.heldout_kl`: mean per-token ``KL(q_S || p_T)`` on the student's greedy completions
  of held-out prompts, each against the teacher (or mixture) the routing assigns; it scores through the
  orchestrator's public plan/score and computes the KL with the training objective's own fused loss.
- :func:`measure_pass_rates`: the validation table of pass-rate routing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from opd_megatron.config import ConfigError, LossConfig
from opd_megatron.data.domains import verify
from opd_megatron.data.jsonl import PromptRow
from opd_megatron.data.render import PromptRenderer, completion_end_ids
from opd_megatron.data.rows import DataError, RowErrors
from opd_megatron.distributed import ParallelGroups
from opd_megatron.distributed.pipeline import broadcast_from_last_stage
from opd_megatron.mopd.orchestrator import is_remote
from opd_megatron.rollout.greedy import greedy_generate
from opd_megatron.rollout.types import SamplingParams
from opd_megatron.targets import MixtureTargets, TeacherTargets
from opd_megatron.teachers.cross import CrossTokenizerTeacher
from opd_megatron.train.batch import MicroBatch
from opd_megatron.train.objectives import DenseObjective


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """A plain prompt's ids: BOS, then the text (the built-in templates' rendering of a ``prompt`` row)."""
    ids = tokenizer.encode(prompt)
    return ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + ids


def check_prompts(render, train_rows, eval_rows: dict, cfg) -> None:
    """Every row renders and leaves room for ``rollout.max_new_tokens`` in the context: checked before
    training, every bad row named (file and line) in one ``DataError``."""
    limit_tokens = cfg.model.max_sequence_length - cfg.rollout.max_new_tokens
    rows = list(train_rows) + [r for rs in eval_rows.values() for r in rs]
    limit = (
        f"model.max_sequence_length={cfg.model.max_sequence_length} - "
        f"rollout.max_new_tokens={cfg.rollout.max_new_tokens}"
    )
    render.check(rows, max_prompt_tokens=limit_tokens, limit=limit)


def check_teacher_prompts(teachers: dict, train_rows, eval_rows: dict, max_new_tokens: int) -> None:
    """Every row renders under each cross-tokeniser teacher's own chat template and, for a co-located
    one, leaves room for ``rollout.max_new_tokens`` in its context: checked before training, so a row a
    teacher's template rejects stops the run at start-up (naming the teacher, file and line) instead of
    failing a step later."""
    rows = list(train_rows) + [r for rs in eval_rows.values() for r in rs]
    for name, t in teachers.items():
        if not isinstance(t, CrossTokenizerTeacher) or not isinstance(t.teacher_prompt, PromptRenderer):
            continue
        model = getattr(t.inner, "model", None)
        room, limit = None, ""
        if model is not None:
            room = model.max_sequence_length - max_new_tokens
            limit = f"the teacher's max_sequence_length={model.max_sequence_length} - rollout.max_new_tokens={max_new_tokens}"
        try:
            t.teacher_prompt.check(rows, max_prompt_tokens=room, limit=limit)
        except DataError as e:
            errors = RowErrors(f"the prompts of teacher {name!r}")
            errors.lines = [f"teacher {name!r} (its chat template): {line}" for line in e.errors]
            errors.raise_if_any()


def exact_match(
    model,
    tokenizer,
    rows_by_domain: dict[str, list[PromptRow]],
    groups: ParallelGroups,
    max_new_tokens: int,
    limit: int,
    batch_size: int = 64,
    prompt_fn=None,
    end_ids: Sequence[int] | None = None,
) -> dict[str, float]:
    """Fraction of rows per domain whose greedy completion the verifier accepts (every rank computes the
    same value; generation is collective across TP/PP). ``prompt_fn(row)`` renders a prompt (default: the
    plain rendering); completions end at any of ``end_ids`` (default: ``prompt_fn.end_ids`` when it has
    them, else EOS)."""
    ends = tuple(end_ids or getattr(prompt_fn, "end_ids", None) or (tokenizer.eos_id,))
    prompt_fn = prompt_fn or (lambda r: prompt_ids(tokenizer, r.prompt))
    scores = {}
    for domain, rows in rows_by_domain.items():
        rows = rows[:limit]
        correct = 0
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            outs = greedy_generate(
                model,
                [prompt_fn(r) for r in chunk],
                max_new_tokens,
                ends,
                tokenizer.pad_id,
                groups,
            )
            correct += sum(verify(r, tokenizer.decode(o)) for r, o in zip(chunk, outs))
        scores[domain] = correct / max(len(rows), 1)
    return scores


def measure_pass_rates(
    teachers: dict, eval_rows, student_tok, max_new_tokens: int, limit: int, prompt_fn=None
):
    """``{domain: {teacher: greedy exact match}}`` of every co-located teacher on the held-out split (the
    validation table of pass-rate routing). Remote teachers only score, so their rows must be configured."""
    table: dict[str, dict[str, float]] = {d: {} for d in eval_rows}
    for name, t in teachers.items():
        if is_remote(t):
            raise ConfigError(
                "mopd.pass_rates",
                f"teacher {name!r} is remote (a scoring service cannot generate); give its pass rates in "
                "mopd.pass_rates",
            )
        cross = isinstance(t, CrossTokenizerTeacher)
        inner = t.inner if cross else t
        tok = t.teacher_tok if cross else student_tok
        render = t.teacher_prompt if cross else prompt_fn
        # A teacher's greedy completion ends where its own template ends a turn.
        ends = completion_end_ids(t.teacher_tok, t.teacher_tpl) if cross else None
        for d, v in exact_match(
            inner.model, tok, eval_rows, inner.groups, max_new_tokens, limit, prompt_fn=render, end_ids=ends
        ).items():
            table[d][name] = v
    return table


class OPDEvaluator:
    """Evaluation of an OPD run's student (``scorer``: the student behind the Teacher interface)."""

    def __init__(self, trainer, lc: LossConfig, limit: int, pass_k: int, seed: int):
        self.t, self.limit, self.pass_k, self.seed = trainer, limit, pass_k, seed
        g = trainer.groups
        eval_lc = LossConfig(divergence="reverse_kl", chunk_size=lc.chunk_size)
        self.kl = DenseObjective(eval_lc, g.tp_group_or_none, trainer.student.real_vocab_size)
        self.kl_by_domain: dict[str, float] = {}

    def __call__(self) -> dict:
        t = self.t
        em = exact_match(
            t.student, t.tokenizer, t.eval_rows, t.groups, t.cfg.rollout.max_new_tokens, self.limit,
            prompt_fn=t.prompt_fn, end_ids=t.prompt_fn.end_ids,
        )  # fmt: skip
        pk = self.pass_at_k(self.pass_k) if self.pass_k else {}
        record = {"heldout_reverse_kl": self.heldout_kl(), **{f"exact_match/{d}": v for d, v in em.items()}}
        record.update({f"heldout_reverse_kl/{d}": v for d, v in self.kl_by_domain.items()})
        record.update({f"pass@{self.pass_k}/{d}": v for d, v in pk.items()})
        return record

    def _greedy_rollouts(self, limit: int):
        t = self.t
        rows = [r for rs in t.eval_rows.values() for r in rs[:limit]]
        prompts = [t.prompt_fn(r) for r in rows]
        ro = t.sampler.generate(
            prompts, SamplingParams(max_new_tokens=t.cfg.rollout.max_new_tokens, temperature=0.0)
        )
        keep = [i for i, c in enumerate(ro.completion_ids) if c]
        return [rows[i] for i in keep], [prompts[i] for i in keep], [ro.completion_ids[i] for i in keep]

    @torch.no_grad()
    def heldout_kl(self, limit: int | None = None) -> float:
        """Mean per-token reverse KL on the student's greedy completions; per domain in ``kl_by_domain``.
        Rollouts routed to remote or cross-tokeniser teachers have no full-vocabulary KL and are left out
        (NaN when no rollout has one)."""
        t, g = self.t, self.t.groups
        rows, prompts, comps = self._greedy_rollouts(self.limit if limit is None else limit)
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for grp in t.orch.plan(rows, prompts, comps, 64) if rows else []:
            pick = lambda xs, idx=grp.indices: [xs[i] for i in idx]  # noqa: E731
            mb = MicroBatch(None, None, None, rows=pick(rows), prompts=pick(prompts), comps=pick(comps))
            mb.teacher_name, mb.target = grp.teacher, grp.target
            if not grp.prescored:  # scored outside the step: not counted as supervision
                mb.target = t.orch.score_microbatch(mb)
            s = t.scorer.score(mb.rows, mb.prompts, mb.comps)
            if s is None or not isinstance(mb.target, TeacherTargets | MixtureTargets):
                continue  # sparse and cross-tokeniser targets have no full-vocabulary KL
            kl_N = self.kl.per_token(s.hidden_NH, s.weight_VH, mb.target).double()
            for row, kl_row in zip(mb.rows, kl_N.split([len(c) for c in mb.comps])):
                sums[row.domain] = sums.get(row.domain, 0.0) + float(kl_row.sum())
                counts[row.domain] = counts.get(row.domain, 0) + kl_row.numel()
        domains = list(t.eval_rows)
        value = None
        if g.is_last_stage:
            total, count = sum(sums.values()), sum(counts.values())
            means = [total / count if count else float("nan")]
            means += [sums[d] / counts[d] if counts.get(d) else float("nan") for d in domains]
            value = torch.tensor(means, dtype=torch.float64, device=g.device)
        value = broadcast_from_last_stage(value, (1 + len(domains),), torch.float64, g).tolist()
        self.kl_by_domain = dict(zip(domains, value[1:]))
        return value[0]

    def pass_at_k(self, k: int) -> dict[str, float]:
        """Share of held-out prompts per domain for which at least one of ``k`` samples (at the rollout
        temperature) verifies; the samples of a prompt are drawn in one batch."""
        t, scores = self.t, {}
        params = replace(t.rollouts.params, seed=self.seed + 17)
        for domain, rows in t.eval_rows.items():
            rows = rows[: self.limit]
            prompts = [t.prompt_fn(r) for r in rows for _ in range(k)]
            texts = [t.tokenizer.decode(c) for c in t.sampler.generate(prompts, params).completion_ids]
            hits = [any(verify(r, texts[i * k + j]) for j in range(k)) for i, r in enumerate(rows)]
            scores[domain] = sum(hits) / max(len(rows), 1)
        return scores
