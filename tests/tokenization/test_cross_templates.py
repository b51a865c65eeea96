"""Cross-tokeniser re-emission with the models' real chat templates: the teacher's prompt is the row
rendered with the teacher's own template, the completion text is re-tokenised and closed with the
teacher's end-of-turn token."""

from __future__ import annotations

import pytest

from opd_megatron.data.render import completion_end_ids, render_prompt
from opd_megatron.data.rows import Message, PromptRow
from opd_megatron.teachers.base import Teacher
from opd_megatron.teachers.cross import CrossTokenizerTeacher
from opd_megatron.tokenization import load_tokenizer
from opd_megatron.tokenization.chat_templates import TemplateError, get_template, reemit
from opd_megatron.tokenization.cross import plan_cross_tokenizer
from opd_megatron.tokenization.jinja_template import template_for
from opd_megatron.tokenization.train_local import train_hf_bpe

ROWS = [
    PromptRow(
        "Name a colour.", "chat", messages=(Message("system", "Be brief."), Message("user", "Name a colour."))
    ),
    PromptRow("What is 12345 + 678?", "math"),
]
ANSWERS = ["Red is a colour.", "The answer is 13023."]


@pytest.mark.parametrize("student_family, teacher_family", [("chatml", "mistral"), ("mistral", "llama3")])
def test_plan_with_both_models_templates(hf_dirs, student_family, teacher_family):
    s_tok, t_tok = load_tokenizer(hf_dirs[student_family]), load_tokenizer(hf_dirs[teacher_family])
    s_tpl, t_tpl = template_for(s_tok, "model"), template_for(t_tok, "model")
    s_end = completion_end_ids(s_tok, s_tpl)[0]
    prompts = [render_prompt(s_tok, s_tpl, r) for r in ROWS]
    completions = [s_tok.encode(ANSWERS[0]) + [s_end], s_tok.encode(ANSWERS[1])]  # the second one unfinished
    teacher_prompts = [render_prompt(t_tok, t_tpl, r) for r in ROWS]
    plan = plan_cross_tokenizer(
        prompts, completions, s_tok, s_tpl, t_tok, t_tpl, teacher_prompt_ids=teacher_prompts
    )
    assert plan.teacher_prompt_ids == teacher_prompts
    t_end = completion_end_ids(t_tok, t_tpl)[0]
    assert plan.teacher_completion_ids[0] == t_tok.encode(ANSWERS[0]) + [t_end]
    assert plan.teacher_completion_ids[1] == t_tok.encode(ANSWERS[1])
    for a in plan.alignments:
        assert b"".join(a.teacher_bytes) == a.text  # same text on both sides (dummy prefix removed)
    assert plan.stats()["align/rate"] > 0.4


def test_reemit_from_a_toy_template_into_a_model_template(hf_dirs):
    s_tok, s_tpl = train_hf_bpe(), get_template("chatml")
    t_tok = load_tokenizer(hf_dirs["llama3"])
    t_tpl = template_for(t_tok, "model")
    prompt = render_prompt(s_tok, s_tpl, ROWS[0])
    r = reemit(
        prompt, s_tok.encode("Red.") + [s_tok.special_token_id("<|im_end|>")], s_tok, s_tpl, t_tok, t_tpl
    )
    assert r.teacher_prompt_ids == render_prompt(t_tok, t_tpl, ROWS[0])
    assert r.ended and r.teacher_completion_ids[-1] == t_tok.special_token_id("<|eot_id|>")


class _Inner(Teacher):
    name = "t"

    def score(self, rows, prompt_ids, completion_ids):  # never reached: construction fails first
        raise AssertionError


def test_model_template_student_needs_a_teacher_prompt(hf_dirs):
    s_tok = load_tokenizer(hf_dirs["chatml"])
    t_tok = load_tokenizer(hf_dirs["mistral"])
    with pytest.raises(
        TemplateError, match="teacher 't': a prompt rendered with the student model's own chat"
    ):
        CrossTokenizerTeacher(
            _Inner(), s_tok, template_for(s_tok, "model"), t_tok, template_for(t_tok, "model")
        )
