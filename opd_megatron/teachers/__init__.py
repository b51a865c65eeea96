"""Teachers score the student's own rollout tokens (the Teacher interface and its implementations)."""

from opd_megatron.teachers.base import Teacher, TeacherError, TeacherTargets, TopKTargets
from opd_megatron.teachers.colocated import MegatronTeacher, build_colocated_teacher
from opd_megatron.teachers.remote import RemoteTeacher, RemoteTeacherClient
from opd_megatron.teachers.self_teacher import SelfTeacher, privileged_prompt, privileged_row

__all__ = [
    "MegatronTeacher",
    "RemoteTeacher",
    "RemoteTeacherClient",
    "SelfTeacher",
    "Teacher",
    "TeacherError",
    "TeacherTargets",
    "TopKTargets",
    "build_colocated_teacher",
    "privileged_prompt",
    "privileged_row",
]
