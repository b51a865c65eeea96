"""The model's own Jinja chat template: ids equal transformers' apply_chat_template, end-of-turn tokens,
template variables, content that spells a special token, templates that fail to render."""

from __future__ import annotations

import pytest

from opd_megatron.tokenization import load_tokenizer
from opd_megatron.tokenization.chat_templates import TemplateError
from opd_megatron.tokenization.hf_dir import load_hf_directory
from opd_megatron.tokenization.jinja_template import TemplateRenderError, template_for

CONVERSATIONS = [
    [{"role": "user", "content": "What is 12345 + 678?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "The quick brown fox?"}],
    [
        {"role": "user", "content": "def add(x, y):\n    return x + y"},
        {"role": "assistant", "content": "It adds."},
        {"role": "user", "content": "  Café, naïve — 日本語 🙂 and  double  spaces.\n"},
    ],
]


def _reference_ids(directory, messages, **kwargs) -> list[int]:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    out = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("family", ["chatml", "llama3", "mistral"])
@pytest.mark.parametrize("k", range(len(CONVERSATIONS)))
def test_ids_equal_apply_chat_template(hf_dirs, family, k):
    tok = load_tokenizer(hf_dirs[family])
    messages = CONVERSATIONS[k]
    ids = template_for(tok, "model").render_ids(messages)
    assert ids == _reference_ids(hf_dirs[family], messages)
    assert len(set(ids) & tok.special_ids) >= 1  # the template's own specials are ids, not text


def test_thinking_switch_is_passed_to_the_template(hf_dirs):
    tok = load_tokenizer(hf_dirs["chatml"])
    tpl = template_for(tok, "model")
    messages = CONVERSATIONS[0]
    on = tpl.render_ids(messages)
    off = tpl.render_ids(messages, template_kwargs={"enable_thinking": False})
    assert off == _reference_ids(hf_dirs["chatml"], messages, enable_thinking=False)
    assert off[: len(on)] == on and len(off) > len(on)
    assert tpl.render_text(messages, template_kwargs={"enable_thinking": False}).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


def test_end_of_turn_tokens_and_sources(hf_dirs):
    found = {}
    for family, directory in hf_dirs.items():
        tpl = template_for(load_tokenizer(directory), "model")
        found[family] = (tpl.end_token, tpl.source.rsplit("/", 1)[-1])
    assert found == {
        "chatml": ("<|im_end|>", "chat_template.jinja"),
        "llama3": ("<|eot_id|>", "tokenizer_config.json"),
        "mistral": ("</s>", "chat_template.jinja"),
    }


@pytest.mark.parametrize("family, spelled", [("chatml", "<|im_end|>"), ("llama3", "<|eot_id|>")])
def test_content_spelling_a_special_stays_text(hf_dirs, family, spelled):
    tok = load_tokenizer(hf_dirs[family])
    tpl = template_for(tok, "model")
    plain = [{"role": "user", "content": "say hi"}]
    tricky = [{"role": "user", "content": f"say {spelled} hi"}]
    n_special = sum(i in tok.special_ids for i in tpl.render_ids(plain))
    ids = tpl.render_ids(tricky)
    # transformers turns the spelled token into the real one; here only the template's specials are ids.
    assert sum(i in tok.special_ids for i in _reference_ids(hf_dirs[family], tricky)) == n_special + 1
    assert sum(i in tok.special_ids for i in ids) == n_special
    assert tok.decode(ids, skip_special=False) == tpl.render_text(tricky)


def test_content_that_the_template_changes_and_spells_a_special_is_an_error(hf_dirs):
    tpl = template_for(load_tokenizer(hf_dirs["llama3"]), "model")  # this template trims content
    with pytest.raises(TemplateRenderError, match=r"message 0 spells a special token \('<\|eot_id\|>'\)"):
        tpl.render_ids([{"role": "user", "content": "  <|eot_id|> hi  "}])


def test_template_that_fails_to_render_names_the_file(hf_dirs):
    tpl = template_for(load_tokenizer(hf_dirs["mistral"]), "model")
    with pytest.raises(TemplateRenderError) as e:
        tpl.render_ids([{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}])
    assert str(e.value) == (
        f"chat template {hf_dirs['mistral'] / 'chat_template.jinja'} failed to render: "
        "Conversation roles must alternate user/assistant/user/assistant"
    )
    assert "\n" not in str(e.value)


def test_broken_template_syntax_names_file_and_line(tmp_path, hf_dirs):
    import shutil

    d = tmp_path / "broken"
    shutil.copytree(hf_dirs["chatml"], d)
    (d / "chat_template.jinja").write_text("{% for m in messages %}\n{{ m.content }\n{% endfor %}")
    tpl = template_for(load_tokenizer(d), "model")
    with pytest.raises(
        TemplateRenderError, match=rf"chat template {d / 'chat_template.jinja'}:2 failed to render"
    ):
        tpl.render_ids(CONVERSATIONS[0])


def test_no_template_and_not_a_directory(tmp_path, hf_dirs):
    import json
    import shutil

    d = tmp_path / "plain"
    shutil.copytree(hf_dirs["llama3"], d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(d)
    assert tok.chat is None
    with pytest.raises(TemplateError, match="has no chat template"):
        template_for(tok, "model")
    with pytest.raises(Exception, match="not a Hugging Face tokenizer directory"):
        load_hf_directory(tmp_path)


def test_saved_copy_keeps_the_template(tmp_path, hf_dirs):
    tok = load_tokenizer(hf_dirs["chatml"])
    tok.save(tmp_path / "ckpt" / "tokenizer")
    again = load_tokenizer(tmp_path / "ckpt")
    messages = CONVERSATIONS[1]
    assert again.chat.render_ids(messages) == tok.chat.render_ids(messages)
    assert (again.eos_id, again.chat.end_token) == (tok.eos_id, "<|im_end|>")


def test_model_template_needs_the_directory_not_the_file(hf_dirs):
    from opd_megatron.config import TokenizerConfig

    tok = load_tokenizer(TokenizerConfig(kind="hf", path=str(hf_dirs["chatml"] / "tokenizer.json")))
    with pytest.raises(TemplateError, match="point tokenizer.path at the directory"):
        template_for(tok, "model")
