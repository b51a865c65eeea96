"""Off-policy distillation for the demo's comparison: sequence-level KD (SFT on the teachers' samples).

Each step takes the same prompts an OPD run of the same data seed takes, lets the teacher that the routing
assigns to each prompt sample a completion (at the rollout temperature), and trains the student by
cross-entropy on those tokens. Everything else (student, teachers, routing by domain, optimizer, schedule,
evaluation, checkpoints) is :class:`~opd_megatron.train.opd.OPDTrainer`'s, so the two runs differ only in
who writes the training sequences and which loss reads them.

Student compute per step: a forward and backward over the batch, about three forward passes; an OPD step
adds the student's own sampling, about one more forward pass over the same sequences
(:data:`STUDENT_PASSES`).
"""

from __future__ import annotations

import time

import torch

from opd_megatron.losses import gather_logprobs
from opd_megatron.models.gpt import output_weight
from opd_megatron.rollout.sampler import MegatronSampler
from opd_megatron.train.batch import MicroBatch, OPDBatch, opd_microbatch
from opd_megatron.train.opd import OPDTrainer
from opd_megatron.train.optim import lr_at
from opd_megatron.train.step import forward_backward, student_hidden

STUDENT_PASSES = {"opd": 4, "seqkd": 3}
"""Student forward-pass equivalents per training sequence and step: backward costs about two forwards,
and OPD samples its own completions (one more, with a KV cache)."""


class SeqKDTrainer(OPDTrainer):
    """SFT of the student on completions its routed teachers sample for the step's prompts."""

    kind = "seqkd"

    def __init__(self, cfg, groups=None):
        super().__init__(cfg, groups)
        tok, end = self.tokenizer, self.prompt_fn.end_ids
        self.teacher_of = {d: t.name for t in cfg.teachers for d in t.domains}
        self.samplers = {
            name: MegatronSampler(
                t.model, t.groups, eos_id=end[0], stop_ids=end[1:], pad_id=tok.pad_id, tokenizer=tok
            )
            for name, t in self.teachers.items()
        }

    def describe(self, start: int) -> str:
        return f"sequence-level KD {self.cfg.name}: SFT on samples of {', '.join(self.samplers)}"

    def progress_info(self, rec: dict) -> str:
        return f"loss {rec['loss']:.4f}" if "loss" in rec else rec.get("reason", "")

    def teacher_samples(self, step: int, rows, prompts) -> list[list[int]]:
        """Each prompt's completion, sampled by the teacher its domain routes to."""
        params = self.rollouts.step_params(step, self.groups.dp_rank)
        comps: list[list[int]] = [[] for _ in rows]
        for name, sampler in self.samplers.items():
            idx = [i for i, r in enumerate(rows) if self.teacher_of.get(r.domain, name) == name]
            if idx:
                out = sampler.generate([prompts[i] for i in idx], params).completion_ids
                for i, c in zip(idx, out):
                    comps[i] = c
        return comps

    def ce_loss(self, hidden_SBH, mb: MicroBatch):
        hidden_NH = hidden_SBH.transpose(0, 1)[mb.loss_positions]
        logits_NV = hidden_NH.float() @ output_weight(self.student).float().t()
        labels_N1 = mb.labels[mb.loss_positions].unsqueeze(-1)
        lp_N = gather_logprobs(logits_NV, labels_N1, self.groups.tp_group_or_none, 1.0, self.vocab)
        n = mb.loss_mask.sum()
        return -lp_N.sum(), {"tokens": n, "kl_sum": torch.zeros(()), "agree_sum": torch.zeros(())}

    @property
    def vocab(self) -> int:
        return self.student.real_vocab_size

    def train_step(self, step: int) -> dict:
        g, t0 = self.groups, time.monotonic()
        rows = self.step_rows()
        prompts = [self.prompt_fn(r) for r in rows]
        comps = self.teacher_samples(step, rows, prompts)
        keep = [i for i, c in enumerate(comps) if c]
        rows, prompts, comps = [rows[i] for i in keep], [prompts[i] for i in keep], [comps[i] for i in keep]
        ones = [[1.0] * len(c) for c in comps]
        batch = OPDBatch(rows, prompts, comps, [[0.0] * len(c) for c in comps], ones, 0.0, 0)
        width = max(len(p) + len(c) for p, c in zip(prompts, comps))
        mb = opd_microbatch(batch, range(len(rows)), width, len(rows), self.tokenizer.pad_id, g.device)
        t_sample = time.monotonic() - t0
        lr = lr_at(step, self.tc)
        self.optimizer.set_lr(lr)
        self.student.train()
        loss, _ = forward_backward(self.student, [mb], student_hidden, self.ce_loss, g, batch.tokens)
        gnorm, skipped = self.optimizer.step(loss, self.tc.grad_clip)
        self.skipped["nonfinite_grad"] += int(skipped)
        return {
            "loss": loss, "grad_norm": gnorm, "lr": lr, "skipped": skipped, "time_teacher_sample": t_sample,
            "time_update": time.monotonic() - t0 - t_sample, "tokens": batch.tokens,
        }  # fmt: skip
