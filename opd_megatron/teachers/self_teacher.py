"""Self-distillation teachers: the student's own weights, conditioned on privileged information.

OPSD / SDFT / SDPO / CRISP: the teacher is a copy of the student that sees the row's ``privileged`` or
``reference`` text before the prompt, while the student sees only the prompt. The copy is a frozen
snapshot of the starting student, an exponential moving average of it (``ema``), or refreshed from it
every ``refresh_every`` steps (``refresh``).
"""

from __future__ import annotations

import torch

from opd_megatron.data.jsonl import PromptRow
from opd_megatron.teachers.colocated import MegatronTeacher


def privileged_prompt(row: PromptRow, source: str = "reference") -> str:
    """The teacher's view: ``"<hint>\\n<prompt>"``, the hint being the row's reference answer
    (``source="reference"``) or its ``privileged`` text; rows without it keep the plain prompt."""
    hint = row.reference if source == "reference" else row.privileged
    if not hint:
        return row.prompt
    return f"{hint}\n{row.prompt}"


class SelfTeacher(MegatronTeacher):
    """A frozen copy of the student (same architecture) that tracks it by EMA or periodic refresh."""

    def __init__(
        self,
        name,
        model,
        groups,
        pad_id,
        encode_prompt,
        *,
        mode="frozen",
        ema_rate=0.99,
        refresh_every=50,
        source="reference",
    ):
        super().__init__(name, model, groups, pad_id, encode_prompt, lambda r: privileged_prompt(r, source))
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
