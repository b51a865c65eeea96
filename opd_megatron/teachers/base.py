"""The Teacher interface.

A teacher receives the rollouts of a micro-batch (prompt rows, the student's prompt token ids and the
completion token ids it sampled) and returns, for every completion token in row-major order, what the
loss needs to compare against the student's prediction of that token. ``N = sum(len(completion))``; row
``i``'s tokens come before row ``i + 1``'s. The student side enumerates its loss positions in the same
order (``loss_mask == 1``, row-major), so the two line up whatever prompt the teacher was shown
(self-distillation shows it a privileged one) or however it tokenised the text.
"""

from __future__ import annotations

import abc

from opd_megatron.data.jsonl import PromptRow
from opd_megatron.targets import CrossTokenizerTargets, TeacherTargets, TopKTargets

__all__ = ["Teacher", "TeacherError", "TeacherTargets", "TopKTargets"]


class TeacherError(RuntimeError):
    """A teacher failed to score (unreachable, bad output); the message names the teacher."""


class Teacher(abc.ABC):
    name: str

    @abc.abstractmethod
    def score(
        self, rows: list[PromptRow], prompt_ids: list[list[int]], completion_ids: list[list[int]]
    ) -> TeacherTargets | TopKTargets | CrossTokenizerTargets | None:
        """Score every completion token; collective over the teacher's TP/PP groups. Returns the targets
        on the last pipeline stage and ``None`` on the others (dense hidden states from a co-located
        teacher, sparse top-k from a remote one)."""

    def after_step(self, student, step: int) -> None:  # noqa: B027 (optional hook)
        """Called after every optimizer step (self-distillation teachers track the student here)."""
