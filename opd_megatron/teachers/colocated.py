"""A frozen Megatron teacher living in the student's processes, under the same TP/PP groups."""

from __future__ import annotations

from collections.abc import Callable

import torch

from opd_megatron.config import TeacherConfig
from opd_megatron.data.jsonl import PromptRow
from opd_megatron.distributed import ParallelGroups, tensor_subgroups
from opd_megatron.distributed.pipeline import pipeline_forward
from opd_megatron.models.checkpoint import load_model_weights, read_config, read_meta, resolve_checkpoint
from opd_megatron.models.gpt import build_gpt_model, output_weight, vocab_shard_range
from opd_megatron.models.hidden import decoder_hidden_states
from opd_megatron.teachers.base import Teacher, TeacherError, TeacherTargets


def right_pad(seqs: list[list[int]], pad_id: int, device) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    out_BS = torch.full((len(seqs), width), pad_id, dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        out_BS[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out_BS


class MegatronTeacher(Teacher):
    """Scores with a Megatron GPTModel; ``teacher_prompt(row)`` may give the teacher other prompt ids
    than the student saw (None: the student's own prompt token ids)."""

    dense = True

    def __init__(
        self,
        name: str,
        model,
        groups: ParallelGroups,
        pad_id: int,
        teacher_prompt: Callable[[PromptRow], list[int]] | None = None,
        vocab_rows: tuple[int, int] | None = None,
        offload_when_idle: bool = False,
    ):
        self.name, self.model, self.groups, self.pad_id = name, model, groups, pad_id
        # Host-memory offload only means something when the model would otherwise sit on a GPU.
        self.offload = offload_when_idle and groups.device.type == "cuda"
        if self.offload:
            model.to("cpu")
        self.teacher_prompt = teacher_prompt
        # Rows of this rank's output-layer shard that match the student's vocabulary shard (a teacher at a
        # smaller TP holds a wider shard than the student rank it serves).
        self.vocab_rows = vocab_rows
        self.calls = 0
        self.tokens_scored = 0

    def _teacher_prompts(self, rows, prompt_ids) -> list[list[int]]:
        if self.teacher_prompt is None:
            return prompt_ids
        return [self.teacher_prompt(r) for r in rows]

    @torch.no_grad()
    def score(self, rows, prompt_ids, completion_ids) -> TeacherTargets | None:
        prompts = self._teacher_prompts(rows, prompt_ids)
        seqs = [p + c for p, c in zip(prompts, completion_ids)]
        limit = self.model.max_sequence_length
        too_long = [i for i, s in enumerate(seqs) if len(s) > limit]
        if too_long:
            raise TeacherError(
                f"teacher {self.name!r}: sequence of row {too_long[0]} is {len(seqs[too_long[0]])} tokens, longer "
                f"than its max_sequence_length={limit}"
            )
        tokens_BS = right_pad(seqs, self.pad_id, self.groups.device)
        pos_BS = torch.arange(tokens_BS.shape[1], device=tokens_BS.device).expand_as(tokens_BS)
        self.model.eval()
        if self.offload:
            self.model.to(self.groups.device)
        try:
            hidden_SBH = pipeline_forward(self.model, tokens_BS, pos_BS, self.groups, stage_fn=_hidden_stage)
            weight_VH = output_weight(self.model).detach() if hidden_SBH is not None else None
            if (
                self.offload and weight_VH is not None
            ):  # the targets outlive this call: keep a device copy of the output layer
                weight_VH = weight_VH.clone()
        finally:
            if self.offload:
                self.model.to("cpu")
        self.calls += 1
        self.tokens_scored += sum(len(c) for c in completion_ids)
        if hidden_SBH is None:
            return None
        # Position t predicts token t + 1: the completion of row i (prompt length P, C tokens) is
        # predicted at positions P - 1 .. P + C - 2.
        parts = [
            hidden_SBH[len(p) - 1 : len(p) - 1 + len(c), i]
            for i, (p, c) in enumerate(zip(prompts, completion_ids))
        ]
        hidden_NH = torch.cat(parts, dim=0) if parts else hidden_SBH.new_zeros(0, hidden_SBH.shape[-1])
        if self.vocab_rows is not None:
            weight_VH = weight_VH[self.vocab_rows[0] : self.vocab_rows[1]]
        return TeacherTargets(hidden_NH=hidden_NH, weight_VH=weight_VH)


def _hidden_stage(model, ids, pos, mask):
    return decoder_hidden_states(model, ids, pos, mask)


def build_colocated_teacher(tcfg: TeacherConfig, groups: ParallelGroups, student_vocab: int, pad_id: int):
    """Build a frozen teacher from its checkpoint (architecture read from the checkpoint's config)."""
    ckpt = resolve_checkpoint(tcfg.checkpoint)
    teacher_vocab = read_meta(ckpt).get("real_vocab_size")
    if teacher_vocab not in (None, student_vocab):
        raise TeacherError(
            f"teacher {tcfg.name!r}: vocabulary of {teacher_vocab} tokens does not match the student's "
            f"{student_vocab}; a teacher with another tokenizer needs cross-tokeniser scoring"
        )
    model_cfg = read_config(ckpt).model
    teacher_tp = tcfg.tensor_model_parallel_size or groups.tp_size
    t_groups = tensor_subgroups(groups, teacher_tp)
    model = build_gpt_model(model_cfg, t_groups, student_vocab, frozen=True, params_dtype=tcfg.dtype)
    load_model_weights(ckpt, model, replicated=teacher_tp < groups.tp_size)
    rows = None
    if teacher_tp < groups.tp_size:
        # The student's shard [s0, s1) lies inside the teacher rank's wider shard [t0, t1).
        s0, s1 = vocab_shard_range(model, groups.tp_rank, groups.tp_size)
        t0, _ = vocab_shard_range(model, t_groups.tp_rank, teacher_tp)
        rows = (s0 - t0, s1 - t0)
    return MegatronTeacher(
        tcfg.name, model, t_groups, pad_id, vocab_rows=rows, offload_when_idle=tcfg.offload_when_idle
    )
