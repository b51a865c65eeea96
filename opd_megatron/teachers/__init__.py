"""Teachers score the student's own rollout tokens (the Teacher interface and its implementations)."""

from opd_megatron.teachers.base import Teacher, TeacherError, TeacherTargets
from opd_megatron.teachers.colocated import MegatronTeacher, build_colocated_teacher
from opd_megatron.teachers.self_teacher import SelfTeacher, privileged_prompt

__all__ = [
    "MegatronTeacher",
    "SelfTeacher",
    "Teacher",
    "TeacherError",
    "TeacherTargets",
    "build_colocated_teacher",
    "privileged_prompt",
]
