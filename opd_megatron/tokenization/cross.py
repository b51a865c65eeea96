"""Batch plan for cross-tokenizer OPD: re-emit student rollouts for a teacher of another tokenizer and map
every student completion token to the teacher completion token it is compared with.

The :class:`~opd_megatron.teachers.base.Teacher` interface returns one target per *teacher* completion
token in row-major order (the target of token ``u`` is the teacher's distribution predicting ``u``). The
plan's ``teacher_index_N`` picks, for each student completion token (row-major), the row of those teacher
targets to compare with: the exactly matching token where ``aligned_N`` (KL / hybrid), else the ULD
partner of :meth:`~opd_megatron.tokenization.alignment.Alignment.fallback_index`, or -1 (no target).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd_megatron.tokenization.alignment import Alignment, align_completion, alignment_stats
from opd_megatron.tokenization.base import Tokenizer
from opd_megatron.tokenization.chat_templates import ChatTemplate, reemit, reemit_completion

__all__ = ["CrossTokenizerPlan", "plan_cross_tokenizer"]


@dataclass
class CrossTokenizerPlan:
    teacher_prompt_ids: list[list[int]]
    teacher_completion_ids: list[list[int]]
    alignments: list[Alignment]
    aligned_N: torch.Tensor
    """Bool, one per student completion token (row-major): the token receives the KL."""
    teacher_index_N: torch.Tensor
    """Long, one per student completion token: row of the teacher's row-major completion targets, or -1."""

    def stats(self) -> dict[str, float]:
        return alignment_stats(self.alignments)


def plan_cross_tokenizer(
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    student_tok: Tokenizer,
    student_tpl: ChatTemplate,
    teacher_tok: Tokenizer,
    teacher_tpl: ChatTemplate,
    teacher_prompt_ids: list[list[int]] | None = None,
) -> CrossTokenizerPlan:
    """Re-emit each rollout under the teacher's template and tokenizer, then align its completion.

    ``teacher_prompt_ids`` given (the teacher's own rendering of each row's prompt, for data whose prompts
    are not chat-formatted): only the completions are re-emitted; otherwise the prompt's turns are
    stripped of the student's template and re-rendered under the teacher's."""
    t_prompts, t_completions, alignments, aligned, index = [], [], [], [], []
    offset = 0  # rows of the teacher's completion targets before this rollout
    for i, (p_ids, c_ids) in enumerate(zip(prompt_ids, completion_ids)):
        if teacher_prompt_ids is None:
            r = reemit(p_ids, c_ids, student_tok, student_tpl, teacher_tok, teacher_tpl)
            t_prompt, t_completion = r.teacher_prompt_ids, r.teacher_completion_ids
        else:
            t_prompt = teacher_prompt_ids[i]
            _, _, t_completion = reemit_completion(c_ids, student_tok, student_tpl, teacher_tok, teacher_tpl)
        a = align_completion(student_tok, list(c_ids), teacher_tok, t_completion)
        t_prompts.append(t_prompt)
        t_completions.append(t_completion)
        alignments.append(a)
        aligned += a.mask
        index += [offset + u if u >= 0 else -1 for u in a.fallback_index()]
        offset += len(t_completion)
    return CrossTokenizerPlan(
        t_prompts,
        t_completions,
        alignments,
        torch.tensor(aligned, dtype=torch.bool),
        torch.tensor(index, dtype=torch.long),
    )
