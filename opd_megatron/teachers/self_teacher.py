"""Self-distillation teachers: the student's own weights, conditioned on privileged information.

OPSD / SDFT / SDPO / CRISP: the teacher is a copy of the student that sees the row's ``privileged`` or
``reference`` text before the prompt, while the student sees only the prompt. The copy is a frozen
snapshot of the starting student, an exponential moving average of it (``ema``), or refreshed from it
every ``refresh_every`` steps (``refresh``).
"""

from __future__ import annotations

import torch

from opd_megatron.data.jsonl import PromptRow
from opd_megatron.data.render import with_hint
from opd_megatron.teachers.colocated import MegatronTeacher


def privileged_row(row: PromptRow, source: str = "reference") -> PromptRow:
    """The teacher's view of a row: the hint (the row's reference answer for ``source="reference"``, else
    its ``privileged`` text) and a newline before the prompt; for a ``messages`` row, before its last user
    message, so the rest of the conversation and the chat template stay as the student sees them. Rows
    without a hint are unchanged."""
    return with_hint(row, row.reference if source == "reference" else row.privileged)


def privileged_prompt(row: PromptRow, source: str = "reference") -> str:
    """The prompt text of :func:`privileged_row`: ``"<hint>\\n<prompt>"`` (the plain prompt without a hint)."""
    return privileged_row(row, source).prompt


class SelfTeacher(MegatronTeacher):
    """A frozen copy of the student (same architecture) that tracks it by EMA or periodic refresh.
    ``render(row)`` gives prompt ids the student's way (its chat template); the teacher gets
    ``render(privileged_row(row))``."""

    def __init__(
        self,
        name,
        model,
        groups,
        pad_id,
        render,
        *,
        mode="frozen",
        ema_rate=0.99,
        refresh_every=50,
        source="reference",
    ):
        super().__init__(name, model, groups, pad_id, lambda r: render(privileged_row(r, source)))
        self.mode, self.ema_rate, self.refresh_every = mode, ema_rate, refresh_every

    @torch.no_grad()
    def sync_from(self, student) -> None:
        for t, s in zip(self.model.parameters(), student.parameters()):
            t.copy_(s.detach().to(t.dtype))

    @torch.no_grad()
    def after_step(self, student, step: int) -> None:
        if self.mode == "ema":
            for t, s in zip(self.model.parameters(), student.parameters()):
                t.mul_(self.ema_rate).add_(s.detach().to(t.dtype), alpha=1.0 - self.ema_rate)
        elif self.mode == "refresh" and step % self.refresh_every == 0:
            self.sync_from(student)
