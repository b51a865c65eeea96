"""render_prompt: one function for every prompt (student, evaluation, each teacher)."""

from __future__ import annotations

import pytest

from opd_megatron.data.render import completion_end_ids, render_prompt, render_prompts
from opd_megatron.data.rows import DataError, Message, PromptRow
from opd_megatron.tokenization import CharTokenizer, load_tokenizer
from opd_megatron.tokenization.chat_templates import elements_from_ids, get_template
from opd_megatron.tokenization.jinja_template import template_for
from opd_megatron.tokenization.train_local import train_hf_bpe

CHAT = PromptRow(
    "Name a colour.",
    "chat",
    messages=(Message("system", "Be brief."), Message("user", "Name a colour.")),
    source="rows.jsonl:7",
)


def test_plain_prompt_rows_keep_bos_plus_text():
    tok = CharTokenizer()
    row = PromptRow("add 001+002=", "addition", "0003")
    ids = render_prompt(tok, get_template("plain"), row)
    assert ids == [tok.bos_id, *tok.encode("add 001+002=")]


def test_messages_under_a_hand_written_template_strip_back_to_the_turns():
    tok = train_hf_bpe()
    tpl = get_template("chatml")
    ids = render_prompt(tok, tpl, CHAT)
    turns, is_open = tpl.strip(elements_from_ids(tok, ids))
    assert is_open and [(t.role, t.content) for t in turns] == [
        ("system", "Be brief."),
        ("user", "Name a colour."),
        ("assistant", ""),
    ]
    assert completion_end_ids(tok, tpl) == (tok.special_token_id("<|im_end|>"), tok.eos_id)


def test_model_template_renders_prompt_rows_as_a_user_turn(hf_dirs):
    tok = load_tokenizer(hf_dirs["llama3"])
    tpl = template_for(tok, "model")
    as_prompt = render_prompt(tok, tpl, PromptRow("Name a colour.", "chat"))
    as_messages = render_prompt(
        tok, tpl, PromptRow("Name a colour.", "chat", messages=(Message("user", "Name a colour."),))
    )
    assert as_prompt == as_messages == tpl.render_ids([{"role": "user", "content": "Name a colour."}])
    assert completion_end_ids(tok, tpl) == (tok.special_token_id("<|eot_id|>"), tok.eos_id)


def test_template_kwargs_reach_the_template(hf_dirs):
    tok = load_tokenizer(hf_dirs["chatml"])
    tpl = template_for(tok, "model")
    off = render_prompt(tok, tpl, CHAT, {"enable_thinking": False})
    assert tok.decode(off, skip_special=False).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert len(off) > len(render_prompt(tok, tpl, CHAT))
    assert completion_end_ids(tok, tpl) == (tok.eos_id,)  # <|im_end|> is both EOS and end of turn here


def test_render_failures_and_long_prompts_name_file_and_line(hf_dirs):
    tok = load_tokenizer(hf_dirs["mistral"])
    tpl = template_for(tok, "model")
    bad = PromptRow(
        "x", "d", messages=(Message("user", "a"), Message("user", "x")), source="data/train.jsonl:12"
    )
    with pytest.raises(DataError) as e:
        render_prompt(tok, tpl, bad)
    assert str(e.value).startswith("data/train.jsonl:12: chat template ") and "must alternate" in str(e.value)
    assert "\n" not in str(e.value)

    long_row = PromptRow("word " * 60, "d", source="data/train.jsonl:13")
    ok = PromptRow("short", "d", source="data/train.jsonl:14")
    with pytest.raises(DataError) as e:
        render_prompts(
            tok,
            tpl,
            [bad, ok, long_row],
            max_prompt_tokens=40,
            limit="model.max_sequence_length=56 - rollout.max_new_tokens=16",
        )
    lines = e.value.errors
    assert lines[0].startswith("data/train.jsonl:12: chat template")
    assert lines[1].startswith("data/train.jsonl:13: the prompt is ") and lines[1].endswith(
        "tokens, longer than the 40 the context leaves for it (model.max_sequence_length=56 - rollout.max_new_tokens=16)"
    )
    assert len(lines) == 2
    assert render_prompts(tok, tpl, [ok], max_prompt_tokens=40) == [render_prompt(tok, tpl, ok)]


def test_hand_written_template_without_the_role_is_a_row_error():
    tok = train_hf_bpe()
    row = PromptRow(
        "q", "d", messages=(Message("user", "q"), Message("tool", "{}")), source="rows.parquet: row 3"
    )
    with pytest.raises(DataError, match=r"^rows.parquet: row 3: template 'chatml' has no role 'tool'"):
        render_prompt(tok, get_template("chatml"), row)


def test_with_hint_puts_the_hint_before_the_last_user_message():
    from opd_megatron.data.render import with_hint

    plain = PromptRow("add 1+2=", "addition", "3")
    assert with_hint(plain, "3").prompt == "3\nadd 1+2=" and with_hint(plain, None) is plain
    row = PromptRow(
        "q2", "d", messages=(Message("user", "q1"), Message("assistant", "a1"), Message("user", "q2"))
    )
    hinted = with_hint(row, "hint")
    assert [m.content for m in hinted.messages] == ["q1", "a1", "hint\nq2"] and hinted.prompt == "hint\nq2"


def test_prompt_renderer_from_config(hf_dirs):
    from opd_megatron.config import TokenizerConfig
    from opd_megatron.data.render import PromptRenderer

    cfg = TokenizerConfig(
        kind="hf",
        path=str(hf_dirs["chatml"]),
        chat_template="model",
        template_kwargs={"enable_thinking": False},
    )
    tok = load_tokenizer(cfg)
    render = PromptRenderer.from_config(tok, cfg)
    assert render(CHAT) == render_prompt(tok, template_for(tok, "model"), CHAT, {"enable_thinking": False})
    assert render.end_ids == (tok.special_token_id("<|im_end|>"),)
    assert render.check([CHAT]) == [render(CHAT)]
    toy = PromptRenderer.from_config(CharTokenizer(), TokenizerConfig())
    row = PromptRow("add 1+2=", "addition")
    assert toy(row) == [toy.tok.bos_id, *toy.tok.encode("add 1+2=")] and toy.end_ids == (toy.tok.eos_id,)
