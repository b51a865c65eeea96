"""The on-policy distillation loop: prompts -> rollouts -> teacher scores -> loss -> optimizer step.

Per step, each data-parallel rank takes ``micro_batch_size * grad_accumulation`` prompts and turns them
into completions (:mod:`~opd_megatron.train.rollouts`: the student's samples, and off-policy sequences
under GKD's lambda). The orchestrator groups the rollouts by supervising teacher and scores them
(:mod:`~opd_megatron.mopd.orchestrator`); each micro-batch's objective, picked by its target's kind
(:mod:`~opd_megatron.train.objectives`), gives the loss; one optimizer step follows
(:mod:`~opd_megatron.train.step`). Resume, metrics, evaluation and save cadence are the run skeleton's
(:mod:`~opd_megatron.train.runner`). The parallel details live behind those modules.

Non-finite teacher scores skip the step on every rank (counted, no parameter change), as does a
non-finite loss or gradient norm (counted apart); rows whose completion is empty are dropped and counted;
a failing teacher aborts the step (counted). A teacher that fails (non-finite scores or an abort) in
``mopd.max_teacher_failures`` consecutive steps it was asked for stops the run, named, however the
routing interleaves it with other teachers (:mod:`~opd_megatron.mopd.failures`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from opd_megatron.config import RunConfig, validate_opd
from opd_megatron.data.domains import build_datasets
from opd_megatron.data.render import PromptRenderer
from opd_megatron.distributed import ParallelGroups, init_distributed
from opd_megatron.distributed.grads import all_finite, dp_ratio, dp_sum
from opd_megatron.models.checkpoint import load_model_weights, verified_checkpoint
from opd_megatron.models.gpt import build_gpt_model, num_parameters, output_weight
from opd_megatron.mopd import MOPDOrchestrator, StepAborted
from opd_megatron.mopd.failures import FAILED, TeacherStreaks
from opd_megatron.mopd.orchestrator import Group
from opd_megatron.mopd.registry import default_teacher
from opd_megatron.rollout.engines import after_optimizer_step, build_sampler
from opd_megatron.rollout.mismatch import engine_mismatch, tis_enabled
from opd_megatron.rollout.types import SamplingParams
from opd_megatron.targets import CrossTokenizerTargets
from opd_megatron.teachers import MegatronTeacher, SelfTeacher
from opd_megatron.teachers.base import TeacherError
from opd_megatron.tokenization import load_tokenizer
from opd_megatron.tokenization.alignment import alignment_stats
from opd_megatron.train.batch import (
    DataCursor,
    MicroBatch,
    OPDBatch,
    opd_microbatch,
    padding_fraction,
    token_budget_split,
)
from opd_megatron.train.evaluate import OPDEvaluator, check_prompts, check_teacher_prompts, measure_pass_rates
from opd_megatron.train.objectives import METRIC_KEYS, Objectives
from opd_megatron.train.optim import lr_at, make_optimizer
from opd_megatron.train.rollouts import RolloutSource
from opd_megatron.train.runner import TrainingRun, domain_values
from opd_megatron.train.step import forward_backward, packed_student_hidden, student_hidden
from opd_megatron.train.teacher_setup import build_run_teachers, describe_teachers


@dataclass
class OPDResult:
    step: int
    eval_before: dict[str, float]
    eval_after: dict[str, float]
    kl_before: float
    kl_after: float
    checkpoint: Path
    wall_s: float
    skipped_steps: int
    """Steps without an update: non-finite scores or gradients, all rollouts empty, a failed teacher."""
    history: list[dict] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    """The counts by reason (``empty_rollouts``: rollouts dropped)."""


SKIP_REASONS = ("nonfinite_teacher", "nonfinite_grad", "all_empty", "teacher_failures", "empty_rollouts")
"""Counters logged as ``skipped_<reason>`` with every train record: steps skipped for non-finite teacher
scores, for a non-finite loss or gradient norm (the optimizer step is skipped), because no rank had a
rollout left, or because a teacher failed (the step aborted); and rollouts dropped as empty."""


class OPDTrainer(TrainingRun):
    """Owns the student, its teachers, the rollout source and the optimizer of one OPD run."""

    kind = "opd"

    def __init__(self, cfg: RunConfig, groups: ParallelGroups | None = None):
        validate_opd(cfg)
        super().__init__(cfg, groups or init_distributed(cfg.parallel, cfg.train.seed))
        cfg = self.cfg  # with Hugging Face checkpoints replaced by their converted copies
        self.lc, g = cfg.loss, self.groups
        self.tokenizer = load_tokenizer(cfg.tokenizer)
        self.prompt_fn = PromptRenderer.from_config(self.tokenizer, cfg.tokenizer)
        """Row -> prompt ids, under the student's chat template (the model's own, or a built-in one)."""
        self.train_rows, self.eval_rows = build_datasets(cfg.data)
        check_prompts(self.prompt_fn, self.train_rows, self.eval_rows, cfg)
        self.student = self.model = build_gpt_model(
            cfg.model, g, self.tokenizer.vocab_size, seed=cfg.train.seed, recompute=self.tc.recompute
        )
        if self.tc.init_checkpoint:
            init = verified_checkpoint(self.tc.init_checkpoint, checksums=self.tc.verify_checksums)
            load_model_weights(init, self.student)
        # Before anything else holds the student: the distributed optimizer moves its parameters into
        # one contiguous buffer.
        self.optimizer = make_optimizer(self.student, self.tc, g)
        self.setup_teachers()
        self.setup_rollouts()
        self.evaluator = OPDEvaluator(self, self.lc, self.tc.eval_samples, self.tc.eval_pass_k, self.tc.seed)
        self.cursor = DataCursor(len(self.train_rows), cfg.data.seed)
        self.skipped = dict.fromkeys(SKIP_REASONS, 0)
        """Skipped steps by reason (:data:`SKIP_REASONS`; ``empty_rollouts`` counts rollouts)."""
        self.failures = TeacherStreaks(self.orch.names, cfg.mopd.max_teacher_failures, g)
        """Consecutive failures per teacher (non-finite scores or an aborted step)."""

    def setup_teachers(self) -> None:
        """The teachers, the orchestrator that routes to them, and G-OPD's reference model."""
        cfg, g, vocab = self.cfg, self.groups, self.tokenizer.vocab_size
        self.teachers = build_run_teachers(cfg, g, self.tokenizer, self.student, self.prompt_fn)
        check_teacher_prompts(self.teachers, self.train_rows, self.eval_rows, cfg.rollout.max_new_tokens)
        self.teacher = self.teachers[default_teacher(cfg)]
        """The default teacher: the one of single-teacher features (mixed sampling, off-policy samples)."""
        pass_rates = None
        if len(self.teachers) > 1 and cfg.mopd.routing == "pass_rate" and not cfg.mopd.pass_rates:
            pass_rates = measure_pass_rates(
                self.teachers, self.eval_rows, self.tokenizer, cfg.rollout.max_new_tokens, self.tc.eval_samples,
                self.prompt_fn,
            )  # fmt: skip
        self.orch = MOPDOrchestrator(
            self.teachers, cfg, g, vocab, self.tc.micro_batch_size, pass_rates, self.tokenizer
        )
        self.reference = None
        if self.lc.objective == "gopd":  # G-OPD's reference: the student as it starts
            ref = build_gpt_model(cfg.model, g, vocab, frozen=True)
            ref.load_state_dict(self.student.state_dict())
            self.reference = MegatronTeacher("reference", ref, g, self.tokenizer.pad_id)

    def setup_rollouts(self) -> None:
        """The student's sampler, the rollout source, the student as a scorer, and the objectives."""
        cfg, g, tok = self.cfg, self.groups, self.tokenizer
        self.scorer = MegatronTeacher("student", self.student, g, tok.pad_id)
        # Completions end at the template's end-of-turn token (EOS for the built-in templates). The
        # engine (rollout.engine) is the trainer's own model, or a vLLM copy refitted after every step.
        self.sampler = build_sampler(cfg, self.student, g, tok, end_ids=self.prompt_fn.end_ids)
        self.rollouts = RolloutSource(
            self.sampler, tok, self.prompt_fn, self.lc, SamplingParams.from_config(cfg.rollout), self.tc.seed
        )
        self.rollouts.samples_per_prompt = cfg.rollout.samples_per_prompt
        self.rollouts.use_teacher(getattr(self.teacher, "model", None), getattr(self.teacher, "groups", g))
        tis = cfg.rollout.tis_cap if tis_enabled(cfg.rollout.tis, self.lc.objective) else None
        self.objectives = Objectives(
            self.lc, g.tp_group_or_none, self.student.real_vocab_size, tok.decode, tis
        )

    # ------------------------------------------------------------------ the skeleton's hooks
    def describe(self, start: int) -> str:
        lc = self.lc
        return (
            f"OPD {self.cfg.name}: student {num_parameters(self.student):,} parameters on this rank, "
            f"teacher(s) {describe_teachers(self.teachers)}, routing {self.orch.routing}, objective "
            f"{lc.objective}{'/' + lc.divergence if lc.objective == 'divergence' else ''}, "
            f"{'resuming at step ' + str(start) if start else 'fresh start'}"
        )

    def progress_info(self, rec: dict) -> str:
        return (
            f"loss {rec['loss']:.4f} kl {rec['kl_per_token']:.4f}" if "loss" in rec else rec.get("reason", "")
        )

    def evaluate(self) -> dict:
        return self.evaluator()

    def extra_models(self) -> dict | None:
        return {"teacher": self.teacher.model} if isinstance(self.teacher, SelfTeacher) else None

    def rank_state(self) -> dict:
        counts = {"rollouts": dict(self.orch.rollouts), "tokens": dict(self.orch.tokens)}
        return {**super().rank_state(), "teacher_counts": {**counts, "failure_streaks": self.failures.streak}}

    def load_rank_state(self, state: dict) -> None:
        """Besides the skeleton's state, the teachers' rollout and token counts (they run over all steps,
        so a resumed run's counters continue where the interrupted one's stopped)."""
        super().load_rank_state(state)
        counts = state.get("teacher_counts", {})
        self.orch.rollouts.update(counts.get("rollouts", {}))
        self.orch.tokens.update(counts.get("tokens", {}))
        self.failures.streak.update(counts.get("failure_streaks", {}))

    def on_resume(self, ckpt: Path) -> None:
        if isinstance(self.teacher, SelfTeacher):
            load_model_weights(ckpt, self.teacher.model, subdir="teacher")
        if self.reference is not None and self.tc.init_checkpoint:
            load_model_weights(self.tc.init_checkpoint, self.reference.model)

    # ------------------------------------------------------------------ one step
    def step_rows(self):
        """This rank's rows of the step, each repeated ``samples_per_prompt`` times (adjacent)."""
        g, tc, n = self.groups, self.tc, self.cfg.rollout.samples_per_prompt
        n_prompts = tc.micro_batch_size * tc.grad_accumulation // n
        idx = self.cursor.take(n_prompts * g.dp_size)[g.dp_rank * n_prompts : (g.dp_rank + 1) * n_prompts]
        return [self.train_rows[i] for i in idx for _ in range(n)]

    def plan(self, batch: OPDBatch) -> list[Group]:
        """The orchestrator's groups (one teacher each); under ``train.max_tokens_per_microbatch`` each
        teacher's rollouts in one group, split by the token budget with similar lengths together."""
        budget = self.tc.max_tokens_per_microbatch
        size = len(batch.rows) if budget else self.tc.micro_batch_size
        plan = self.orch.plan(batch.rows, batch.prompts, batch.comps, size)
        if not budget:
            return plan
        lengths = [len(p) + len(c) for p, c in zip(batch.prompts, batch.comps)]
        out = []
        for grp in plan:
            for part in token_budget_split(grp.indices, lengths, budget):
                target = grp.target
                if target is not None:  # prescored (confidence routing): keep this part's rows
                    local = [grp.indices.index(i) for i in part]
                    target = target.take_rows([len(batch.comps[i]) for i in grp.indices], local)
                out.append(Group(grp.teacher, part, target, grp.prescored))
        return out

    def score(self, batch: OPDBatch) -> list[MicroBatch]:
        """The step's micro-batches, one per group of rollouts a teacher supervises, with their targets.
        Each is as wide as its longest rollout (the step's longest under pipeline parallelism, whose
        stages exchange fixed shapes)."""
        g, size = self.groups, self.tc.micro_batch_size
        step_width = max(len(p) + len(c) for p, c in zip(batch.prompts, batch.comps))
        mbs = []
        for grp in self.plan(batch):
            n_rows = size if g.pp_size > 1 else len(grp.indices)
            width = (
                step_width
                if g.pp_size > 1
                else max(len(batch.prompts[i]) + len(batch.comps[i]) for i in grp.indices)
            )
            mb = opd_microbatch(batch, grp.indices, width, n_rows, self.tokenizer.pad_id, g.device)
            mb.teacher_name, mb.target, mb.prescored = grp.teacher, grp.target, grp.prescored
            mbs.append(mb)
        self.orch.score(mbs)
        if self.reference is not None:
            for mb in mbs:
                mb.reference = self.reference.score(mb.rows, mb.prompts, mb.comps)
        return mbs

    def loss(self, hidden_SBH, mb: MicroBatch):
        hidden_NH = hidden_SBH.transpose(0, 1)[mb.loss_positions]  # row-major: the targets' order
        return self.objectives.loss(hidden_NH, output_weight(self.student), mb)

    def train_step(self, step: int) -> dict:
        g = self.groups
        t0 = time.monotonic()
        batch = self.rollouts.make(step, self.step_rows(), g.dp_rank)
        self.skipped["empty_rollouts"] += batch.empty
        t_rollout = time.monotonic() - t0
        if not all_finite(0.0 if batch.rows else float("nan"), g):  # a rank has nothing to learn from
            self.skipped["all_empty"] += 1
            return self.skip_record(
                "all rollouts empty" if not batch.rows else "another rank's rollouts empty", batch.lam
            )
        t1 = time.monotonic()
        try:
            mbs = self.score(batch)
        except StepAborted as e:
            return self.abort(step, e, batch.lam)
        outcome = self.failures.of_microbatches(mbs)
        every = self.cfg.mopd.disagreement_every
        js = self.orch.disagreement(mbs) if every and step % every == 0 else None
        t_score = time.monotonic() - t1
        global_tokens = int(dp_sum(float(batch.tokens), g))
        outcome = self.failures.agree(outcome)  # every rank learns of a non-finite teacher on any
        if self.failures.failed(outcome):
            return self.nonfinite_teacher(step, outcome, batch.lam)
        mismatch = (
            engine_mismatch(self.scorer, mbs, g, self.lc.temperature, self.student.real_vocab_size)
            if self.cfg.rollout.engine != "megatron"
            else {}
        )
        lr = lr_at(step, self.tc)
        self.optimizer.set_lr(lr)
        t2 = time.monotonic()
        self.student.train()
        forward = packed_student_hidden if self.tc.pack_sequences else student_hidden
        loss, m = forward_backward(self.student, mbs, forward, self.loss, g, global_tokens, METRIC_KEYS)
        gnorm, skipped = self.optimizer.step(loss, self.tc.grad_clip)
        engine = {}
        if skipped:
            self.skipped["nonfinite_grad"] += 1
        else:
            for t in self.teachers.values():
                t.after_step(self.student, step + 1)
            engine = after_optimizer_step(self.sampler, self.student)  # a vLLM engine takes the new weights
        self.failures.record(outcome)  # the teachers of this step scored fine: their streaks end
        times = {"time_rollout": t_rollout, "time_score": t_score, "time_update": time.monotonic() - t2}
        rec = {"loss": loss, "grad_norm": gnorm, "lr": lr, "skipped": skipped, **times, **engine, **mismatch}
        return self.step_record(rec, m, batch, mbs, js, global_tokens)

    def step_record(self, rec: dict, m: dict, batch: OPDBatch, mbs, js, global_tokens: int) -> dict:
        """The train record of a completed step: loss metrics, time shares, teacher counters, alignment."""
        t_step = rec["time_rollout"] + rec["time_score"] + rec["time_update"]
        tokens = max(m["tokens"], 1.0)
        out = {**self.orch.counters(), **({"teacher_js": js} if js is not None else {})}
        cross = [
            a for mb in mbs if isinstance(mb.target, CrossTokenizerTargets) for a in mb.target.alignments
        ]
        if cross:
            out.update(alignment_stats(cross))
        n = self.cfg.rollout.samples_per_prompt
        # Every rank takes part, also one without verifiable rows.
        if n > 1 and (rate := dp_ratio(*batch.pass_counts, self.groups)) is not None:
            out[f"pass@{n}"] = rate
        gen, t_roll = batch.generated_tokens, rec["time_rollout"]
        out.update(
            share_rollout=t_roll / t_step,
            share_score=rec["time_score"] / t_step,
            share_update=rec["time_update"] / t_step,
            kl_per_token=m["kl_sum"] / tokens,
            top1_agreement=m["agree_sum"] / tokens,
            **rec,
            **{"lambda": batch.lam},
            rollout_len=batch.tokens / len(batch.comps),
            rollout_ended_fraction=batch.ended_fraction,
            generated_tokens=gen,
            padding_fraction=padding_fraction(mbs),
            # With packed sequences the student's decoder computes none of that padding.
            decoder_padding_fraction=0.0 if self.tc.pack_sequences else padding_fraction(mbs),
            rollout_tokens_per_s=gen / t_roll if t_roll > 0 and gen else 0.0,
            train_tokens_per_s=global_tokens / (rec["time_score"] + rec["time_update"]),
        )
        return {**out, **self.skip_counters()}

    def skip_counters(self) -> dict:
        return {f"skipped_{k}": v for k, v in self.skipped.items()}

    def skip_record(self, reason: str, lam: float, **extra) -> dict:
        return {"skipped": True, "reason": reason, "lambda": lam, **extra, **self.skip_counters()}

    def nonfinite_teacher(self, step: int, outcome: dict[str, float], lam: float) -> dict:
        """Non-finite teacher scores (on some rank): no update; a teacher non-finite in
        ``mopd.max_teacher_failures`` consecutive steps it supervised stops the run, named."""
        self.skipped["nonfinite_teacher"] += 1
        names, stop = self.failures.failed(outcome), self.failures.record(outcome)
        if self.groups.is_main:
            who = ", ".join(repr(n) for n in names)
            print(
                f"step {step + 1}: non-finite scores from {who}; step skipped (no parameter change)",
                flush=True,
            )
        if stop:
            raise TeacherError(
                f"teacher {stop[0]!r}: non-finite scores in {self.failures.streak[stop[0]]} consecutive steps "
                "it supervised (mopd.max_teacher_failures); the checkpoints on disk are the last good ones"
            )
        return self.skip_record("non-finite teacher scores", lam, teacher=", ".join(names))

    def skipped_steps(self) -> int:
        return sum(v for k, v in self.skipped.items() if k != "empty_rollouts")

    def abort(self, step: int, err: StepAborted, lam: float) -> dict:
        """A teacher failed: no update this step (on any rank); a teacher failing in
        ``mopd.max_teacher_failures`` consecutive steps it was asked for ends the run with its error (the
        checkpoints on disk are the last good ones)."""
        self.skipped["teacher_failures"] += 1
        mine = dict.fromkeys(self.failures.members(err.teacher), FAILED) if err.teacher else {}
        outcome = self.failures.agree(mine) or dict.fromkeys(self.failures.names, FAILED)
        names, stop = self.failures.failed(outcome), self.failures.record(outcome)
        who = ", ".join(f"teacher {n!r}" for n in names)
        if self.groups.is_main:
            print(f"step {step + 1}: {who} failed, step aborted (no parameter change): {err}", flush=True)
        if stop:
            streak = self.failures.streak[stop[0]]
            raise TeacherError(
                f"teacher {stop[0]!r}: {streak} consecutive steps aborted; last: {err}"
            ) from err
        return self.skip_record(f"{who} failed", lam, teacher=", ".join(names))

    # ------------------------------------------------------------------ the run
    def run(self) -> OPDResult:
        try:
            s = super().run()
            if self.groups.is_main:
                from opd_megatron.train.plots import plot_metrics

                plot_metrics(self.out_dir / "metrics.jsonl", self.out_dir / "curves.png")
        finally:
            close = getattr(self.sampler, "close", None)
            if close is not None:  # a vLLM engine: closed last (closing it ends torch.distributed)
                close()
        em = lambda rec: domain_values(rec, "exact_match")  # noqa: E731
        kl = lambda rec: rec.get("heldout_reverse_kl", float("nan"))  # noqa: E731
        return OPDResult(
            s.steps, em(s.first_eval), em(s.last_eval), kl(s.first_eval), kl(s.last_eval), s.checkpoint,
            s.wall_s, self.skipped_steps(), s.history, dict(self.skipped),
        )  # fmt: skip


def run_opd(cfg: RunConfig, groups: ParallelGroups | None = None) -> OPDResult:
    return OPDTrainer(cfg, groups).run()
