"""Self-distillation teachers track the student: frozen, EMA with a rate, or periodic refresh."""

from __future__ import annotations

import pytest
import torch

from opd_megatron.data.jsonl import PromptRow
from opd_megatron.teachers import SelfTeacher, privileged_prompt


def _teacher(mode: str, **kw) -> tuple[SelfTeacher, torch.nn.Linear]:
    student = torch.nn.Linear(3, 2)
    copy = torch.nn.Linear(3, 2)
    teacher = SelfTeacher("self", copy, None, 0, lambda row: [], mode=mode, **kw)
    teacher.sync_from(student)
    return teacher, student


def _bump(student: torch.nn.Linear, by: float) -> None:
    with torch.no_grad():
        for p in student.parameters():
            p.add_(by)


def test_frozen_snapshot_never_moves():
    teacher, student = _teacher("frozen")
    start = [p.clone() for p in teacher.model.parameters()]
    _bump(student, 1.0)
    teacher.after_step(student, 1)
    assert all(torch.equal(a, b) for a, b in zip(start, teacher.model.parameters()))


def test_ema_moves_by_one_minus_rate():
    teacher, student = _teacher("ema", ema_rate=0.9)
    start = [p.clone() for p in teacher.model.parameters()]
    _bump(student, 1.0)
    teacher.after_step(student, 1)
    for a, b in zip(start, teacher.model.parameters()):
        torch.testing.assert_close(b, a + 0.1)  # 0.9 * t + 0.1 * (t + 1)


def test_refresh_copies_every_k_steps():
    teacher, student = _teacher("refresh", refresh_every=3)
    _bump(student, 1.0)
    teacher.after_step(student, 2)
    assert not torch.equal(teacher.model.weight, student.weight)
    teacher.after_step(student, 3)
    assert torch.equal(teacher.model.weight, student.weight)


@pytest.mark.parametrize(
    "row, source, expected",
    [
        (PromptRow("sort 31=", "sorting", reference="13", privileged="counts"), "reference", "13\nsort 31="),
        (
            PromptRow("sort 31=", "sorting", reference="13", privileged="counts"),
            "privileged",
            "counts\nsort 31=",
        ),
        (PromptRow("sort 31=", "sorting"), "reference", "sort 31="),
    ],
)
def test_privileged_view(row, source, expected):
    assert privileged_prompt(row, source) == expected


def test_a_messages_row_keeps_its_conversation_for_the_teacher():
    """The hint goes before the last user message; the system prompt and earlier turns stay, and the
    teacher's prompt is rendered by the student's own renderer."""
    from opd_megatron.data.rows import Message

    seen = []
    teacher = SelfTeacher(
        "self", torch.nn.Linear(3, 2), None, 0, lambda row: seen.append(row) or [7], mode="frozen"
    )
    history = (
        Message("system", "Be brief."),
        Message("user", "sort 21="),
        Message("assistant", "12"),
        Message("user", "sort 31="),
    )
    row = PromptRow("sort 31=", "sorting", reference="13", messages=history)
    assert teacher.teacher_prompt(row) == [7]
    assert seen[0].messages == (*history[:3], Message("user", "13\nsort 31="))
    assert seen[0].prompt == "13\nsort 31=" and privileged_prompt(row) == "13\nsort 31="
