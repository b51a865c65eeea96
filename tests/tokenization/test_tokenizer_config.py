"""TokenizerConfig for the model's own template, and loading a Hugging Face tokenizer directory from it."""

from __future__ import annotations

import pytest

from opd_megatron.config import ConfigError, load_config
from opd_megatron.tokenization import load_tokenizer


def test_model_template_config_loads_the_directory(hf_dirs):
    cfg = load_config(
        overrides=[
            "tokenizer.kind=hf",
            f"tokenizer.path={hf_dirs['chatml']}",
            "tokenizer.chat_template=model",
            "tokenizer.template_kwargs.enable_thinking=false",
        ]
    )
    assert cfg.tokenizer.template_kwargs == {"enable_thinking": False}
    tok = load_tokenizer(cfg.tokenizer)
    assert tok.chat is not None and tok.chat.end_token == "<|im_end|>"


@pytest.mark.parametrize(
    "overrides, path, message",
    [
        (["tokenizer.chat_template=model"], "tokenizer.chat_template", "needs kind 'hf'"),
        (
            ["tokenizer.template_kwargs.enable_thinking=false"],
            "tokenizer.template_kwargs",
            "only the model's own Jinja template takes variables",
        ),
    ],
)
def test_bad_tokenizer_config(overrides, path, message):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=overrides)
    assert e.value.path == path and message in e.value.message
