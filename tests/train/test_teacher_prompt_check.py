"""Start-up check of the prompts as each cross-tokeniser teacher renders them with its own template."""

from __future__ import annotations

import pytest

from opd_megatron.config import ModelConfig, ParallelConfig
from opd_megatron.data.render import PromptRenderer
from opd_megatron.data.rows import DataError, Message, PromptRow
from opd_megatron.tokenization import load_tokenizer
from opd_megatron.tokenization.jinja_template import template_for
from tests.tokenization.hf_dirs import hf_dirs  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def teachers(hf_dirs):  # noqa: F811
    """A ChatML student and a Mistral-style teacher (strict user/assistant alternation, context 40)."""
    from opd_megatron.distributed import init_distributed
    from opd_megatron.models.gpt import build_gpt_model
    from opd_megatron.teachers import MegatronTeacher
    from opd_megatron.teachers.cross import CrossTokenizerTeacher

    groups = init_distributed(ParallelConfig(), 0)
    s_tok, t_tok = load_tokenizer(hf_dirs["chatml"]), load_tokenizer(hf_dirs["mistral"])
    cfg = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=2, max_sequence_length=40)
    inner = MegatronTeacher("mistral", build_gpt_model(cfg, groups, t_tok.vocab_size, frozen=True), groups, 0)
    t_tpl = template_for(t_tok, "model")
    cross = CrossTokenizerTeacher(
        inner, s_tok, template_for(s_tok, "model"), t_tok, t_tpl, teacher_prompt=PromptRenderer(t_tok, t_tpl)
    )
    return {"mistral": cross, "colocated": inner}


def test_rows_every_teacher_renders_pass(teachers):
    from opd_megatron.train.evaluate import check_teacher_prompts

    rows = [PromptRow("Name a colour.", "chat", source="train.jsonl:1")]
    check_teacher_prompts(teachers, rows, {"chat": rows}, max_new_tokens=8)


def test_a_row_the_teacher_template_rejects_is_named_at_start_up(teachers):
    from opd_megatron.train.evaluate import check_teacher_prompts

    good = PromptRow("Name a colour.", "chat", source="train.jsonl:1")
    # Two user turns in a row: ChatML renders it, the Mistral-style template raises.
    twice = PromptRow(
        "again", "chat", messages=(Message("user", "hi"), Message("user", "again")), source="train.jsonl:2"
    )
    long = PromptRow("word " * 60, "chat", source="eval.jsonl:7")
    with pytest.raises(DataError) as e:
        check_teacher_prompts(teachers, [good, twice], {"chat": [long]}, max_new_tokens=8)
    lines = e.value.errors
    assert len(lines) == 2
    assert lines[0].startswith("teacher 'mistral' (its chat template): train.jsonl:2: chat template ")
    assert "must alternate" in lines[0]
    assert lines[1].startswith("teacher 'mistral' (its chat template): eval.jsonl:7: the prompt is ")
    assert "max_sequence_length=40 - rollout.max_new_tokens=8" in lines[1]
