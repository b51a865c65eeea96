"""The on-policy distillation loop: prompts -> rollouts -> teacher scores -> loss -> optimizer step.

Per step, each data-parallel rank takes ``micro_batch_size * grad_accumulation`` prompts. A share
lambda of them (GKD; constant or ramped as in DistiLLM) get completions the student samples itself
(optionally from the teacher-mixed distribution of MiniLLM), the rest get off-policy completions (the
row's reference, or a teacher sample). The teacher scores every completion token; the loss is either the
fused vocab-parallel divergence on those tokens or a sampled-token objective (tinker, MiniLLM, G-OPD,
AOPD, OPSD, RLSD). The loop holds no parallelism code: samplers, teachers, the loss and the step
function take the process groups.

Non-finite teacher scores skip the step on every rank (counted, no parameter change). Rows whose
completion is empty are dropped and counted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from opd_megatron.config import ConfigError, RunConfig, save_config
from opd_megatron.data.domains import build_datasets, verify
from opd_megatron.data.jsonl import PromptRow
from opd_megatron.distributed import ParallelGroups, init_distributed
from opd_megatron.distributed.grads import all_finite
from opd_megatron.distributed.pipeline import broadcast_from_last_stage
from opd_megatron.losses import (
    aopd_loss,
    distributed_topk,
    fused_linear_divergence,
    gather_logprobs,
    gopd_loss,
    minillm_loss,
    rlsd_loss,
    tinker_loss,
)
from opd_megatron.losses.uld import shared_vocab
from opd_megatron.models.checkpoint import (
    latest_checkpoint,
    load_model_weights,
    load_rank_state,
    read_meta,
    save_checkpoint,
)
from opd_megatron.models.gpt import build_gpt_model, num_parameters, output_weight
from opd_megatron.models.hidden import decoder_hidden_states
from opd_megatron.mopd import MOPDOrchestrator, StepAborted, build_teachers
from opd_megatron.mopd.orchestrator import MixtureTargets, is_remote, measure_pass_rates
from opd_megatron.mopd.registry import default_teacher
from opd_megatron.rollout.sampler import MegatronSampler
from opd_megatron.rollout.types import Rollout, SamplingParams
from opd_megatron.teachers import MegatronTeacher, SelfTeacher, Teacher, TeacherTargets
from opd_megatron.teachers.base import TeacherError, TopKTargets
from opd_megatron.teachers.cross import CrossTokenizerTargets, CrossTokenizerTeacher
from opd_megatron.tokenization import load_tokenizer
from opd_megatron.tokenization.alignment import alignment_stats
from opd_megatron.train.evaluate import exact_match, prompt_ids
from opd_megatron.train.metrics import MetricsLogger, Progress
from opd_megatron.train.optim import build_optimizer, lr_at, set_lr
from opd_megatron.train.preemption import PreemptionHandler
from opd_megatron.train.sft import DataCursor, pad_batch
from opd_megatron.train.step import forward_backward, optimizer_step
from opd_megatron.train.target_loss import (
    cross_loss,
    dense_loss,
    mixture_logprobs,
    mixture_loss,
    teacher_logprobs,
    topk_loss,
)

SAMPLED_OBJECTIVES = ("tinker", "minillm", "gopd", "aopd", "rlsd")
METRIC_KEYS = ("tokens", "kl_sum", "agree_sum")


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
    history: list[dict] = field(default_factory=list)


def lambda_at(step: int, cfg) -> float:
    """GKD's on-policy share for ``step``; the ``linear`` schedule ramps it DistiLLM-style."""
    if cfg.lambda_schedule == "constant":
        return cfg.on_policy_lambda
    frac = min(1.0, step / cfg.lambda_ramp_steps)
    return cfg.lambda_start + (cfg.on_policy_lambda - cfg.lambda_start) * frac


def validate_opd_config(cfg: RunConfig) -> None:
    """OPD-specific consistency checks (beyond each section's own validation). Several teachers, remote
    teachers and teachers of another tokenizer go through the MOPD orchestrator, which supports the
    full-distribution objectives; the features that need one teacher's dense logits over the student's
    vocabulary (sampled-token objectives, teacher-mixed sampling, teacher-sampled off-policy data) need
    exactly one co-located (or self) teacher of the student's tokenizer."""
    from opd_megatron.mopd import validate_mopd_config

    validate_mopd_config(cfg)
    lc = cfg.loss
    t = cfg.teachers[0]
    single_dense = len(cfg.teachers) == 1 and t.placement != "remote" and t.tokenizer is None
    needs = [
        (
            lc.objective in SAMPLED_OBJECTIVES or lc.objective == "opsd",
            "loss.objective",
            f"objective {lc.objective!r}",
        ),
        (lc.mix_alpha > 0, "loss.mix_alpha", "teacher-mixed sampling"),
        (
            lc.on_policy_lambda < 1 and lc.off_policy_source == "teacher",
            "loss.off_policy_source",
            "teacher-sampled off-policy data",
        ),
    ]
    for bad, path, what in needs:
        if bad and not single_dense:
            raise ConfigError(
                path,
                f"{what} needs exactly one co-located teacher with the student's tokenizer "
                f"(got {len(cfg.teachers)} teacher(s), the first {t.placement!r}"
                f"{' with its own tokenizer' if t.tokenizer else ''})",
            )
    if lc.objective in SAMPLED_OBJECTIVES and (lc.on_policy_lambda < 1 or lc.lambda_schedule != "constant"):
        raise ConfigError(
            "loss.on_policy_lambda",
            f"the sampled-token objective {lc.objective!r} is on-policy; set it to 1.0",
        )
    if lc.mix_alpha > 0 and t.placement == "self":
        raise ConfigError(
            "loss.mix_alpha", "teacher-mixed sampling needs a teacher with the student's prompt view"
        )
    if lc.mix_alpha > 0 and t.tensor_model_parallel_size not in (None, cfg.parallel.tp):
        raise ConfigError(
            "loss.mix_alpha", "teacher-mixed sampling needs the teacher at the student's TP size"
        )
    if lc.objective == "opsd" and lc.opsd_tau <= 0:
        raise ConfigError("loss.opsd_tau", "objective 'opsd' needs a per-token clip tau > 0")


def student_hidden(model, mb):
    tokens = mb["tokens"]
    pos = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    return decoder_hidden_states(model, tokens, pos)


class OPDTrainer:
    """Owns the student, its teacher, the sampler and the optimizer of one OPD run."""

    def __init__(self, cfg: RunConfig, groups: ParallelGroups | None = None):
        validate_opd_config(cfg)
        self.cfg, self.lc, self.tc = cfg, cfg.loss, cfg.train
        self.groups = groups or init_distributed(cfg.parallel, cfg.train.seed)
        self.tokenizer = load_tokenizer(cfg.tokenizer)
        self.train_rows, self.eval_rows = build_datasets(cfg.data)
        vocab = self.tokenizer.vocab_size
        self.student = build_gpt_model(cfg.model, self.groups, vocab, seed=cfg.train.seed)
        if self.tc.init_checkpoint:
            load_model_weights(self.tc.init_checkpoint, self.student)
        self.teachers = self._build_teachers(vocab)
        self.teacher = self.teachers[default_teacher(cfg)]
        """The default teacher: the one of single-teacher features (mixed sampling, off-policy samples)."""
        pass_rates = None
        if len(self.teachers) > 1 and cfg.mopd.routing == "pass_rate" and not cfg.mopd.pass_rates:
            pass_rates = measure_pass_rates(
                self.teachers,
                self.eval_rows,
                self.tokenizer,
                cfg.rollout.max_new_tokens,
                cfg.train.eval_samples,
            )
        self.orch = MOPDOrchestrator(
            self.teachers, cfg, self.groups, vocab, cfg.train.micro_batch_size, pass_rates, self.tokenizer
        )
        cross = {n: t for n, t in self.teachers.items() if isinstance(t, CrossTokenizerTeacher)}
        self.shared_vocab = {
            n: shared_vocab(self.tokenizer, t.teacher_tok, t.end_pairs()) for n, t in cross.items()
        }

        self.reference = None
        if self.lc.objective == "gopd":  # G-OPD's reference: the student as it starts
            ref = build_gpt_model(cfg.model, self.groups, vocab, frozen=True)
            ref.load_state_dict(self.student.state_dict())
            self.reference = MegatronTeacher("reference", ref, self.groups, self.tokenizer.pad_id)
        self.scorer = MegatronTeacher("student", self.student, self.groups, self.tokenizer.pad_id)
        self.sampler = MegatronSampler(
            self.student,
            self.groups,
            eos_id=self.tokenizer.eos_id,
            pad_id=self.tokenizer.pad_id,
            tokenizer=self.tokenizer,
        )
        self.optimizer = build_optimizer(self.student, self.tc)
        self.cursor = DataCursor(len(self.train_rows), cfg.data.seed)
        self.params = SamplingParams.from_config(cfg.rollout)
        self.max_eval_tokens = cfg.rollout.max_new_tokens
        self.skipped = {"nonfinite": 0, "empty_rollouts": 0, "teacher_failures": 0}
        self.consecutive_failures = 0
        self.heldout_kl_by_domain: dict[str, float] = {}

    # ------------------------------------------------------------------ construction
    def _build_teachers(self, vocab: int) -> dict[str, Teacher]:
        t = self.cfg.teachers[0]
        if t.placement != "self":
            return build_teachers(self.cfg, self.groups, self.tokenizer, prompt_ids)
        model = build_gpt_model(self.cfg.model, self.groups, vocab, frozen=True)
        teacher = SelfTeacher(
            t.name,
            model,
            self.groups,
            self.tokenizer.pad_id,
            lambda text: prompt_ids(self.tokenizer, text),
            mode=t.self_mode,
            ema_rate=t.ema_rate,
            refresh_every=t.refresh_every,
            source=t.privileged_source,
        )
        teacher.sync_from(self.student)
        return {t.name: teacher}

    # ------------------------------------------------------------------ data
    def _completions(self, step: int, rows: list[PromptRow]):
        """Prompt ids, completion ids, behaviour log-probs and token weights for this step's rows."""
        prompts = [prompt_ids(self.tokenizer, r.prompt) for r in rows]
        lam = lambda_at(step, self.lc)
        n_on = round(lam * len(rows))
        seed = self.tc.seed * 1_000_003 + step * 131 + self.groups.dp_rank
        params = SamplingParams(**{**self.params.__dict__, "seed": seed})
        comps: list[list[int]] = []
        behaviour: list[list[float]] = []
        weights: list[list[float]] = []
        if n_on:
            mix = (self.teacher.model, self.lc.mix_alpha) if self.lc.mix_alpha > 0 else None
            ro: Rollout = self.sampler.generate(prompts[:n_on], params, mix_with=mix)
            comps += ro.completion_ids
            behaviour += ro.logprobs
            iw = ro.importance_weights or [[1.0] * len(c) for c in ro.completion_ids]
            weights += iw
        off = rows[n_on:]
        if off and self.lc.off_policy_source == "teacher":
            sampler = MegatronSampler(
                self.teacher.model,
                self.teacher.groups,
                eos_id=self.tokenizer.eos_id,
                pad_id=self.tokenizer.pad_id,
                tokenizer=self.tokenizer,
            )
            ro = sampler.generate(prompts[n_on:], params)
            comps += ro.completion_ids
        elif off:
            for r in off:
                if r.reference is None:
                    raise ConfigError(
                        "loss.off_policy_source", f"row {r.prompt!r} has no reference completion"
                    )
                comps.append(self.tokenizer.encode(r.reference) + [self.tokenizer.eos_id])
        for c in comps[len(behaviour) :]:
            behaviour.append([0.0] * len(c))
            weights.append([1.0] * len(c))
        keep = [i for i, c in enumerate(comps) if len(c) > 0]
        self.skipped["empty_rollouts"] += len(comps) - len(keep)
        pick = lambda xs: [xs[i] for i in keep]  # noqa: E731
        return pick(rows), pick(prompts), pick(comps), pick(behaviour), pick(weights), lam, n_on

    @staticmethod
    def _grid(prompts, comps, values, width, rows: int | None = None) -> torch.Tensor:
        """Place per-completion-token values at their loss positions of a ``[B, width]`` grid (``rows``
        >= ``len(prompts)`` rows; the extra ones stay 0)."""
        grid = torch.zeros(rows or len(prompts), width)
        for i, (p, c, v) in enumerate(zip(prompts, comps, values)):
            grid[i, len(p) - 1 : len(p) - 1 + len(c)] = torch.tensor(v, dtype=torch.float32)
        return grid

    def _microbatches(self, rows, prompts, comps, behaviour, weights, names):
        """Micro-batches of at most ``micro_batch_size`` rollouts, each supervised by one teacher (``names``
        per rollout; teachers in order of first appearance). All share one width; under pipeline
        parallelism all also share one row count (padding rows carry no loss), as the stages exchange
        fixed shapes."""
        seqs = [p + c for p, c in zip(prompts, comps)]
        width = max(len(s) for s in seqs)
        size = self.tc.micro_batch_size
        chunks = []
        for name in dict.fromkeys(names):
            idx = [i for i, n in enumerate(names) if n == name]
            chunks += [(name, idx[i : i + size]) for i in range(0, len(idx), size)]
        mbs = []
        for name, idx in chunks:
            pick = lambda xs, idx=idx: [xs[i] for i in idx]  # noqa: E731
            m_rows, m_prompts, m_comps = pick(rows), pick(prompts), pick(comps)
            n_rows = size if self.groups.pp_size > 1 else len(idx)
            tokens = torch.full((n_rows, width), self.tokenizer.pad_id, dtype=torch.long)
            for j, i in enumerate(idx):
                tokens[j, : len(seqs[i])] = torch.tensor(seqs[i])
            labels = torch.roll(tokens, -1, dims=1)
            labels[:, -1] = self.tokenizer.pad_id

            grids = {
                key: self._grid(m_prompts, m_comps, values, width, n_rows)
                for key, values in (
                    ("loss_mask", [[1.0] * len(c) for c in m_comps]),
                    ("behaviour", pick(behaviour)),
                    ("weights", pick(weights)),
                )
            }
            mb = {"tokens": tokens, "labels": labels, **grids}
            mb = pad_batch(mb, width, self.tokenizer.pad_id, self.groups.device)
            mb["rows"], mb["prompts"], mb["comps"], mb["teacher_name"] = m_rows, m_prompts, m_comps, name
            mbs.append(mb)
        return mbs

    # ------------------------------------------------------------------ loss
    def _loss(self, hidden_SBH, mb):
        lc, g = self.lc, self.groups
        mask_BS = mb["loss_mask"].bool()
        hidden_NH = hidden_SBH.transpose(0, 1)[mask_BS]  # row-major: the teacher's order
        tgt = mb["teacher"]
        weight_VH = output_weight(self.student)
        vocab = self.student.real_vocab_size
        group = g.tp_group if g.tp_size > 1 else None
        weights_N = mb["weights"][mask_BS]
        if isinstance(tgt, MixtureTargets):
            parts = mixture_loss(hidden_NH, weight_VH, tgt.parts, tgt.weights_MN, weights_N, lc, group, vocab)
        elif isinstance(tgt, CrossTokenizerTargets):
            name = mb["teacher_name"]
            parts = cross_loss(
                hidden_NH, weight_VH, tgt, weights_N, lc, group, vocab,
                self.teachers[name].teacher_tok.vocab_size, self.shared_vocab[name], self.teachers[name].projector,
            )  # fmt: skip
        elif isinstance(tgt, TopKTargets):
            parts = topk_loss(hidden_NH, weight_VH, tgt, weights_N, lc, group, vocab)
        elif lc.objective in ("divergence", "opsd"):
            clip = lc.opsd_tau if lc.objective == "opsd" else None
            parts = dense_loss(hidden_NH, weight_VH, tgt, weights_N, lc, group, vocab, clip)
        else:
            return self._sampled_loss(hidden_NH, weight_VH, tgt, mb, mask_BS)
        loss, kl_sum, agree_sum = parts
        return loss, {"tokens": mask_BS.sum(), "kl_sum": kl_sum, "agree_sum": agree_sum}

    def _sampled_loss(self, hidden_NH, weight_VH, tgt, mb, mask_BS):
        """Sampled-token objectives on ``[B, S]`` grids (they need each sequence's structure)."""
        lc, g = self.lc, self.groups
        group = g.tp_group if g.tp_size > 1 else None
        vocab = self.student.real_vocab_size
        labels_N1 = mb["labels"][mask_BS].unsqueeze(-1)
        s_logits_NV = hidden_NH.float() @ weight_VH.float().t()
        t_logits_NV = tgt.logits_NV()
        s_lp_N = gather_logprobs(s_logits_NV, labels_N1, group, lc.temperature, vocab).squeeze(-1)
        t_lp_N = gather_logprobs(t_logits_NV, labels_N1, group, lc.temperature, vocab).squeeze(-1)

        def grid(values_N):
            out = torch.zeros(mask_BS.shape, dtype=values_N.dtype, device=values_N.device)
            return out.masked_scatter(mask_BS, values_N)

        s_lp, t_lp, mask = grid(s_lp_N), grid(t_lp_N), mb["loss_mask"]
        behaviour = mb["behaviour"]
        common = {"reduction": "token_mean", "normaliser": 1.0}
        if lc.objective == "tinker":
            out = tinker_loss(s_lp, t_lp, mask, discount=lc.discount, behaviour_logprobs=behaviour, **common)
        elif lc.objective == "minillm":
            out = minillm_loss(
                s_lp, t_lp, mask, sampling_logprobs=behaviour if lc.mix_alpha > 0 else None, **common
            )
        elif lc.objective == "gopd":
            r_lp = grid(
                gather_logprobs(mb["reference"].logits_NV(), labels_N1, group, lc.temperature, vocab).squeeze(
                    -1
                )
            )
            out = gopd_loss(s_lp, t_lp, r_lp, mask, lam=lc.gopd_lambda, discount=lc.discount, **common)
        elif lc.objective == "aopd":
            top = distributed_topk(t_logits_NV / lc.temperature, lc.aopd_topk, group, vocab)
            t_top = gather_logprobs(t_logits_NV, top.indices, group, lc.temperature, vocab)
            s_top = gather_logprobs(s_logits_NV, top.indices, group, lc.temperature, vocab)
            k = top.indices.shape[-1]
            grid_k = lambda v: torch.zeros(*mask_BS.shape, k, dtype=v.dtype).masked_scatter(  # noqa: E731
                mask_BS.unsqueeze(-1).expand(-1, -1, k), v
            )
            out = aopd_loss(s_lp, t_lp, grid_k(s_top), grid_k(t_top), mask, **common)
        elif lc.objective == "rlsd":
            signs = [
                1.0 if verify(r, self.tokenizer.decode(c)) else -1.0 for r, c in zip(mb["rows"], mb["comps"])
            ]
            adv_B = torch.tensor(signs)
            out = rlsd_loss(s_lp, t_lp, adv_B, mask, eps_w=lc.rlsd_eps, **common)
        else:  # validated in LossConfig
            raise AssertionError(lc.objective)
        kl_sum = ((s_lp - t_lp).detach() * mask).sum()  # sampled-token reverse-KL estimate
        agree = (
            (s_logits_NV.argmax(-1) == t_logits_NV.argmax(-1)).float().sum()
            if g.tp_size == 1
            else torch.tensor(0.0)
        )
        return out.loss, {"tokens": mask.sum(), "kl_sum": kl_sum, "agree_sum": agree}

    # ------------------------------------------------------------------ one step
    def train_step(self, step: int) -> dict:
        g, tc = self.groups, self.tc
        n_rows = tc.micro_batch_size * tc.grad_accumulation
        all_idx = self.cursor.take(n_rows * g.dp_size)
        idx = all_idx[g.dp_rank * n_rows : (g.dp_rank + 1) * n_rows]
        rows = [self.train_rows[i] for i in idx]
        t0 = time.monotonic()
        rows, prompts, comps, behaviour, weights, lam, n_on = self._completions(step, rows)
        t_rollout = time.monotonic() - t0
        gen_tokens = sum(len(c) for c in comps[:n_on])
        if not rows:  # every completion was empty: nothing to learn from, no step
            return {"skipped": True, "reason": "all rollouts empty", "lambda": lam}
        t1 = time.monotonic()
        cross_teachers = [t for t in self.teachers.values() if isinstance(t, CrossTokenizerTeacher)]
        for t in cross_teachers:
            t.pop_alignments()  # drop what evaluation scored
        try:
            names = self.orch.assign(rows, prompts, comps)
            for t in cross_teachers:
                t.pop_alignments()  # confidence routing scored every rollout; keep the routed ones
            mbs = self._microbatches(rows, prompts, comps, behaviour, weights, names)
            self.orch.score(mbs)
        except StepAborted as e:
            return self._abort(step, e, lam)
        finite = all(mb["teacher"] is None or mb["teacher"].finite() for mb in mbs)
        if self.reference is not None:
            for mb in mbs:
                mb["reference"] = self.reference.score(mb["rows"], mb["prompts"], mb["comps"])
        every = self.cfg.mopd.disagreement_every
        js = self.orch.disagreement(mbs) if every and step % every == 0 else None
        cross = [a for t in cross_teachers for a in t.pop_alignments()]
        t_score = time.monotonic() - t1
        local_tokens = torch.tensor([float(sum(len(c) for c in comps))], device=g.device)
        if g.dp_size > 1:
            torch.distributed.all_reduce(local_tokens, group=g.dp_group)
        global_tokens = int(local_tokens.item())
        if not all_finite(0.0 if finite else float("nan"), g):
            self.skipped["nonfinite"] += 1
            if g.is_main:
                print(
                    f"step {step + 1}: non-finite teacher scores; step skipped (no parameter change)",
                    flush=True,
                )
            return {"skipped": True, "reason": "non-finite teacher scores", "lambda": lam}
        lr = lr_at(step, tc)
        set_lr(self.optimizer, lr)
        t2 = time.monotonic()
        self.student.train()
        loss, m = forward_backward(
            self.student, mbs, student_hidden, self._loss, g, global_tokens, METRIC_KEYS
        )
        gnorm, skipped = optimizer_step(self.student, self.optimizer, g, loss, tc.grad_clip)
        if skipped:
            self.skipped["nonfinite"] += 1
        else:
            for t in self.teachers.values():
                t.after_step(self.student, step + 1)
        self.consecutive_failures = 0
        t_update = time.monotonic() - t2
        tokens = max(m["tokens"], 1.0)
        t_step = t_rollout + t_score + t_update
        extra = {**self.orch.counters(), **({"teacher_js": js} if js is not None else {})}
        if cross:
            extra.update(alignment_stats(cross))
        return {
            **extra,
            "share_rollout": t_rollout / t_step,
            "share_score": t_score / t_step,
            "share_update": t_update / t_step,
            "loss": loss,
            "kl_per_token": m["kl_sum"] / tokens,
            "top1_agreement": m["agree_sum"] / tokens,
            "grad_norm": gnorm,
            "lr": lr,
            "lambda": lam,
            "skipped": skipped,
            "rollout_len": sum(len(c) for c in comps) / len(comps),
            "rollout_tokens_per_s": gen_tokens / t_rollout if t_rollout > 0 and gen_tokens else 0.0,
            "train_tokens_per_s": global_tokens / (t_score + t_update),
            "time_rollout": t_rollout,
            "time_score": t_score,
            "time_update": t_update,
        }

    def _abort(self, step: int, err: StepAborted, lam: float) -> dict:
        """A teacher failed: no update this step (on any rank); too many in a row end the run with the
        teacher's error (the checkpoints on disk are the last good ones)."""
        self.skipped["teacher_failures"] += 1
        self.consecutive_failures += 1
        who = f"teacher {err.teacher!r}" if err.teacher else "a teacher on another rank"
        if self.groups.is_main:
            print(f"step {step + 1}: {who} failed, step aborted (no parameter change): {err}", flush=True)
        if self.consecutive_failures >= self.cfg.mopd.max_teacher_failures:
            raise TeacherError(f"{self.consecutive_failures} consecutive steps aborted; last: {err}") from err
        return {"skipped": True, "reason": f"{who} failed", "teacher": err.teacher or "", "lambda": lam}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def heldout_kl(self, limit: int) -> float:
        """Mean per-token reverse KL(student || teacher) on the student's greedy completions of held-out
        prompts, each against the teacher (or mixture) the routing assigns: the quantity OPD minimises,
        measured where the student actually goes. Rollouts routed to remote or cross-tokeniser teachers
        have no full-vocabulary KL and are left out (NaN when no rollout has one)."""
        g = self.groups
        rows = [r for rs in self.eval_rows.values() for r in rs[:limit]]
        prompts = [prompt_ids(self.tokenizer, r.prompt) for r in rows]
        ro = self.sampler.generate(
            prompts, SamplingParams(max_new_tokens=self.max_eval_tokens, temperature=0.0)
        )
        keep = [i for i, c in enumerate(ro.completion_ids) if c]
        rows, prompts, comps = (
            [rows[i] for i in keep],
            [prompts[i] for i in keep],
            [ro.completion_ids[i] for i in keep],
        )
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        names = self.orch.assign(rows, prompts, comps) if rows else []
        for name in dict.fromkeys(names):
            idx = [i for i, n in enumerate(names) if n == name]
            for i in range(0, len(idx), 64):
                sel = idx[i : i + 64]
                mb = {
                    "teacher_name": name,
                    "rows": [rows[j] for j in sel],
                    "prompts": [prompts[j] for j in sel],
                    "comps": [comps[j] for j in sel],
                }
                s = self.scorer.score(mb["rows"], mb["prompts"], mb["comps"])
                t = self.orch._score_mb(mb)
                if s is None or not isinstance(t, TeacherTargets | MixtureTargets):
                    continue  # sparse and cross-tokeniser targets have no full-vocabulary KL
                teacher = (
                    {"teacher_hidden_TH": t.hidden_NH, "teacher_weight_VH": t.weight_VH}
                    if isinstance(t, TeacherTargets)
                    else {"teacher_logits_TV": mixture_logprobs(
                        [teacher_logprobs(p, g.tp_group if g.tp_size > 1 else None, self.student.real_vocab_size) for p in t.parts],
                        t.weights_MN,
                    )}
                )  # fmt: skip
                out = fused_linear_divergence(
                    s.hidden_NH,
                    s.weight_VH,
                    **teacher,
                    normaliser=1.0,
                    divergence="reverse_kl",
                    tp_group=g.tp_group if g.tp_size > 1 else None,
                    vocab_size=self.student.real_vocab_size,
                )
                per_row = out.per_token.detach().double().split([len(c) for c in mb["comps"]])
                for row, kl_row in zip(mb["rows"], per_row):
                    sums[row.domain] = sums.get(row.domain, 0.0) + float(kl_row.sum())
                    counts[row.domain] = counts.get(row.domain, 0) + kl_row.numel()
        domains = list(self.eval_rows)
        value = None
        if g.is_last_stage:
            total, count = sum(sums.values()), sum(counts.values())
            means = [total / count if count else float("nan")]
            means += [sums[d] / counts[d] if counts.get(d) else float("nan") for d in domains]
            value = torch.tensor(means, dtype=torch.float64, device=g.device)
        value = broadcast_from_last_stage(value, (1 + len(domains),), torch.float64, g).tolist()
        self.heldout_kl_by_domain = dict(zip(domains, value[1:]))
        return value[0]

    def pass_at_k(self, k: int, limit: int) -> dict[str, float]:
        """Share of held-out prompts per domain for which at least one of ``k`` samples (at the rollout
        temperature) verifies; the samples of a prompt are drawn in one batch."""
        scores = {}
        for domain, rows in self.eval_rows.items():
            rows = rows[:limit]
            prompts = [prompt_ids(self.tokenizer, r.prompt) for r in rows for _ in range(k)]
            params = SamplingParams(**{**self.params.__dict__, "seed": self.tc.seed + 17})
            texts = [self.tokenizer.decode(c) for c in self.sampler.generate(prompts, params).completion_ids]
            hits = [any(verify(r, texts[i * k + j]) for j in range(k)) for i, r in enumerate(rows)]
            scores[domain] = sum(hits) / max(len(rows), 1)
        return scores

    def evaluate(self) -> tuple[dict[str, float], float, dict[str, float]]:
        """Greedy exact match per domain, held-out reverse KL, and pass@k per domain."""
        limit = self.tc.eval_samples
        em = exact_match(
            self.student, self.tokenizer, self.eval_rows, self.groups, self.max_eval_tokens, limit
        )
        pk = self.pass_at_k(self.tc.eval_pass_k, limit) if self.tc.eval_pass_k else {}
        return em, self.heldout_kl(limit), pk

    def _eval_record(self, em, kl, pk) -> dict:
        rec = {"heldout_reverse_kl": kl, **{f"exact_match/{d}": v for d, v in em.items()}}
        rec.update({f"heldout_reverse_kl/{d}": v for d, v in self.heldout_kl_by_domain.items()})
        rec.update({f"pass@{self.tc.eval_pass_k}/{d}": v for d, v in pk.items()})
        return rec

    # ------------------------------------------------------------------ state
    def _rank_state(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "data": self.cursor.state(),
            "skipped": dict(self.skipped),
        }

    def save(self, step: int) -> Path:
        extra = {"teacher": self.teacher.model} if isinstance(self.teacher, SelfTeacher) else None
        return save_checkpoint(
            Path(self.tc.output_dir) / "checkpoints",
            step,
            self.student,
            self.groups,
            config=self.cfg,
            tokenizer=self.tokenizer,
            rank_state=self._rank_state(),
            keep_last=self.tc.keep_last,
            extra_models=extra,
        )

    def maybe_resume(self) -> int:
        ckpt = latest_checkpoint(Path(self.tc.output_dir) / "checkpoints") if self.tc.resume else None
        if ckpt is None:
            return 0
        load_model_weights(ckpt, self.student)
        if isinstance(self.teacher, SelfTeacher):
            load_model_weights(ckpt, self.teacher.model, subdir="teacher")
        if self.reference is not None and self.tc.init_checkpoint:
            load_model_weights(self.tc.init_checkpoint, self.reference.model)
        state = load_rank_state(ckpt, self.groups)
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        self.cursor = DataCursor(len(self.train_rows), self.cfg.data.seed, **state["data"])
        self.skipped.update(state.get("skipped", {}))
        return read_meta(ckpt)["step"]

    def _describe_teachers(self) -> str:
        parts = []
        for name, t in self.teachers.items():
            model = getattr(t, "model", None)
            kind = (
                "remote" if is_remote(t) else f"{num_parameters(model):,} params" if model is not None else ""
            )
            if isinstance(t, CrossTokenizerTeacher):
                kind += ", own tokenizer"
            parts.append(f"{name!r} ({kind})")
        return ", ".join(parts)

    # ------------------------------------------------------------------ the run
    def run(self) -> OPDResult:
        t_start = time.monotonic()
        g, tc = self.groups, self.tc
        out_dir = Path(tc.output_dir)
        start = self.maybe_resume()
        if g.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, out_dir / "config.yaml")
            print(
                f"OPD {self.cfg.name}: student {num_parameters(self.student):,} parameters on this rank, "
                f"teacher(s) {self._describe_teachers()}, routing {self.orch.routing}, objective {self.lc.objective}"
                f"{'/' + self.lc.divergence if self.lc.objective == 'divergence' else ''}, "
                f"{'resuming at step ' + str(start) if start else 'fresh start'}",
                flush=True,
            )
        metrics = MetricsLogger(out_dir, enabled=g.is_main, resume=start > 0)
        preempt = PreemptionHandler.install()
        em_before, kl_before = ({}, float("nan"))
        if start == 0:
            em_before, kl_before, pk = self.evaluate()
            metrics.log("eval", 0, self._eval_record(em_before, kl_before, pk))
        progress = Progress(
            tc.steps,
            f"opd {self.cfg.name}",
            enabled=g.is_main and tc.progress,
            start=start,
            log_every=tc.log_every,
        )
        history = []
        for step in range(start, tc.steps):
            rec = self.train_step(step)
            rec.update({f"skipped_{k}": v for k, v in self.skipped.items()})
            metrics.log("train", step + 1, rec)
            history.append(rec)
            info = (
                f"loss {rec['loss']:.4f} kl {rec['kl_per_token']:.4f}"
                if "loss" in rec
                else rec.get("reason", "")
            )
            progress.update(step + 1, info)
            done = step + 1
            if tc.eval_every and done % tc.eval_every == 0 and done < tc.steps:
                metrics.log("eval", done, self._eval_record(*self.evaluate()))
            if tc.save_every and done % tc.save_every == 0 and done < tc.steps:
                self.save(done)
            if preempt.sync(None) and done < tc.steps:
                progress.close()
                ckpt = self.save(done)
                metrics.log("preempted", done, {"checkpoint": str(ckpt)})
                metrics.close()
                preempt.finish(ckpt)
        progress.close()
        em_after, kl_after, pk_after = self.evaluate()
        metrics.log("eval", tc.steps, self._eval_record(em_after, kl_after, pk_after))
        ckpt = self.save(tc.steps)
        metrics.close()
        if g.is_main:
            from opd_megatron.train.plots import plot_metrics

            plot_metrics(out_dir / "metrics.jsonl", out_dir / "curves.png")
        return OPDResult(
            tc.steps,
            em_before,
            em_after,
            kl_before,
            kl_after,
            ckpt,
            time.monotonic() - t_start,
            self.skipped["nonfinite"],
            history,
        )


def run_opd(cfg: RunConfig, groups: ParallelGroups | None = None) -> OPDResult:
    return OPDTrainer(cfg, groups).run()
