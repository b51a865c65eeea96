"""The teachers of an OPD run: built from config (the MOPD registry), or, for self-distillation, a copy of
the student that sees the row's privileged text."""

from __future__ import annotations

from opd_megatron.config import RunConfig
from opd_megatron.distributed import ParallelGroups
from opd_megatron.models.gpt import build_gpt_model, num_parameters
from opd_megatron.mopd import build_teachers
from opd_megatron.mopd.orchestrator import is_remote
from opd_megatron.teachers import SelfTeacher, Teacher
from opd_megatron.teachers.cross import CrossTokenizerTeacher


def build_run_teachers(
    cfg: RunConfig, groups: ParallelGroups, tokenizer, student, render
) -> dict[str, Teacher]:
    """Teachers by name in config order. ``render(row)`` gives the student's prompt ids (a
    self-distillation teacher sees the row with its privileged text rendered the same way)."""
    t = cfg.teachers[0]
    if t.placement != "self":
        return build_teachers(cfg, groups, tokenizer)
    model = build_gpt_model(cfg.model, groups, tokenizer.vocab_size, frozen=True)
    teacher = SelfTeacher(
        t.name,
        model,
        groups,
        tokenizer.pad_id,
        render,
        mode=t.self_mode,
        ema_rate=t.ema_rate,
        refresh_every=t.refresh_every,
        source=t.privileged_source,
    )
    teacher.sync_from(student)
    return {t.name: teacher}


def describe_teachers(teachers: dict[str, Teacher]) -> str:
    parts = []
    for name, t in teachers.items():
        model = getattr(t, "model", None)
        kind = "remote" if is_remote(t) else f"{num_parameters(model):,} params" if model is not None else ""
        if isinstance(t, CrossTokenizerTeacher):
            kind += ", own tokenizer"
        parts.append(f"{name!r} ({kind})")
    return ", ".join(parts)
