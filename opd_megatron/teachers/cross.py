"""A teacher of another tokenizer behind the ordinary Teacher interface (cross-tokeniser OPD).

The student's rollout is re-emitted for the teacher (its completion text re-tokenised by the teacher's
tokenizer and closed with the teacher's end-of-turn token, its prompt rendered the teacher's way: from the
data row with the teacher model's own chat template, see :func:`opd_megatron.data.render.render_prompt`,
or, for the hand-written toy templates, by stripping the student's), the wrapped teacher scores that on its own
tokenisation, and the boundary-agreement plan says, for every student completion token, which teacher
row it is compared with and whether the two share a next-token event (KL) or only a context (ULD).
Any teacher works inside: a co-located Megatron model of the teacher's vocabulary (dense targets) or a
scoring service (top-k targets).
"""

from __future__ import annotations

from opd_megatron.data.jsonl import PromptRow
from opd_megatron.losses.uld import shared_vocab
from opd_megatron.targets import CrossTokenizerTargets, TeacherTargets
from opd_megatron.teachers.base import Teacher
from opd_megatron.tokenization.base import Tokenizer
from opd_megatron.tokenization.chat_templates import ChatTemplate, TemplateError, end_token_id
from opd_megatron.tokenization.cross import PrefixProjector, plan_cross_tokenizer


class CrossTokenizerTeacher(Teacher):
    """Wraps ``inner`` (a teacher over ``teacher_tok``'s vocabulary) for a student using ``student_tok``.

    ``teacher_prompt(row)`` gives the teacher's prompt ids for a row; with it the prompt text comes from
    the data row itself (prompts that are not chat-formatted). Without it the student's prompt ids are
    stripped of ``student_tpl`` and re-rendered under ``teacher_tpl``."""

    def __init__(
        self,
        inner: Teacher,
        student_tok: Tokenizer,
        student_tpl: ChatTemplate,
        teacher_tok: Tokenizer,
        teacher_tpl: ChatTemplate,
        teacher_prompt=None,
    ):
        if teacher_prompt is None and hasattr(student_tpl, "render_ids"):
            raise TemplateError(
                f"teacher {inner.name!r}: a prompt rendered with the student model's own chat template cannot be "
                "stripped; pass teacher_prompt (the row rendered with the teacher's template by render_prompt)"
            )
        self.name, self.inner = inner.name, inner
        self.student_tok, self.student_tpl = student_tok, student_tpl
        self.teacher_tok, self.teacher_tpl = teacher_tok, teacher_tpl
        self.teacher_prompt = teacher_prompt
        self.projector = PrefixProjector(student_tok, teacher_tok, self.end_pairs())
        """Teacher distribution -> the student's next token (see the projected cross-tokeniser loss)."""
        self.shared_ids = shared_vocab(student_tok, teacher_tok, self.end_pairs())
        """(student ids, teacher ids) of the exact vocabulary intersection (the ``shared`` cross KL)."""
        self.calls = 0
        self.tokens_scored = 0

    def end_pairs(self) -> tuple[tuple[int, int], ...]:
        """(student id, teacher id) of the tokens that end a completion on each side: re-emission turns
        the student's end-of-turn (or EOS) into the teacher's end-of-turn, so they are the same event."""
        s_end, t_end = (
            end_token_id(self.student_tok, self.student_tpl),
            end_token_id(self.teacher_tok, self.teacher_tpl),
        )
        return ((s_end, t_end), (self.student_tok.eos_id, t_end))

    @property
    def model(self):
        return getattr(self.inner, "model", None)

    @property
    def dense(self) -> bool:
        return getattr(self.inner, "dense", True)

    def score(
        self, rows: list[PromptRow], prompt_ids: list[list[int]], completion_ids: list[list[int]]
    ) -> CrossTokenizerTargets:
        """The plan on every rank (alignment statistics travel with the targets); the wrapped teacher's
        targets inside on the last pipeline stage, ``None`` there elsewhere."""
        plan = plan_cross_tokenizer(
            prompt_ids,
            completion_ids,
            self.student_tok,
            self.student_tpl,
            self.teacher_tok,
            self.teacher_tpl,
            teacher_prompt_ids=[self.teacher_prompt(r) for r in rows] if self.teacher_prompt else None,
        )
        inner = self.inner.score(rows, plan.teacher_prompt_ids, plan.teacher_completion_ids)
        self.calls += 1
        self.tokens_scored += sum(len(c) for c in completion_ids)
        if inner is None:
            device = "cpu"
        else:
            device = inner.hidden_NH.device if isinstance(inner, TeacherTargets) else inner.topk_ids_NK.device
        return CrossTokenizerTargets(
            inner,
            plan.aligned_N.to(device),
            plan.teacher_index_N.to(device),
            plan.teacher_completion_ids,
            plan.alignments,
            plan.context_N.to(device),
            plan.prefix_N,
            teacher_vocab=self.teacher_tok.vocab_size,
            projector=self.projector,
            shared_ids=self.shared_ids,
        )
