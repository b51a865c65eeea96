"""Hugging Face tokenizer directories built here (tokenizers trained locally, chat templates written for
these tests in the style of three model families), for the chat-template and data tests."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from opd_megatron.tokenization.train_local import (
    CHATML_SPECIALS,
    DEMO_CORPUS,
    write_hf_tokenizer_dir,
)
from opd_megatron.tokenization.train_local import CHATML_THINKING_TEMPLATE as CHATML_THINKING

# Llama-3 style: BOS, header tokens around the role, trimmed content, <|eot_id|> after every turn.
LLAMA3 = """\
{{- bos_token -}}
{%- for message in messages -%}
<|start_header_id|>{{ message.role }}<|end_header_id|>

{{ message.content | trim }}<|eot_id|>
{%- endfor -%}
{%- if add_generation_prompt -%}
<|start_header_id|>assistant<|end_header_id|>

{% endif -%}
"""

# Mistral style: [INST] blocks, the system prompt folded into the first user turn, strict alternation.
MISTRAL = """\
{{- bos_token -}}
{%- if messages[0].role == 'system' -%}
{%- set system = messages[0].content + '\\n\\n' -%}{%- set turns = messages[1:] -%}
{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- endif -%}
{%- for message in turns -%}
{%- if (message.role == 'user') != (loop.index0 % 2 == 0) -%}
{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant') -}}
{%- endif -%}
{%- if message.role == 'user' -%}
[INST] {{ (system if loop.first else '') + message.content }} [/INST]
{%- else -%}
{{ message.content }}{{ eos_token }}
{%- endif -%}
{%- endfor -%}
"""

LLAMA3_SPECIALS = [
    "<|end_of_text|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]


def write_bpe_dir(path: Path, template: str, specials: list[str], config: dict, template_file: bool) -> Path:
    """A byte-level BPE directory; the template goes to ``chat_template.jinja`` or ``tokenizer_config.json``."""
    return write_hf_tokenizer_dir(path, template, specials, config, template_file)


def chatml_dir(path: Path) -> Path:
    return write_bpe_dir(
        path,
        CHATML_THINKING,
        list(CHATML_SPECIALS),
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        True,
    )


def llama3_dir(path: Path) -> Path:
    return write_bpe_dir(
        path,
        LLAMA3,
        LLAMA3_SPECIALS,
        {"eos_token": "<|end_of_text|>", "bos_token": "<|begin_of_text|>"},
        False,
    )


def sentencepiece_model(add_dummy_prefix: bool, vocab_size: int = 400) -> bytes:
    """A SentencePiece BPE trained here (byte fallback, identity normalisation, whitespace kept)."""
    import sentencepiece as spm

    lines = [line for text in DEMO_CORPUS for line in text.splitlines() if line]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines * 4),
        model_writer=model,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        add_dummy_prefix=add_dummy_prefix,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        control_symbols=["[INST]", "[/INST]"],
        user_defined_symbols=["\n", "\t"],
        minloglevel=2,
    )
    return model.getvalue()


def mistral_dir(path: Path) -> Path:
    """A Llama/Mistral-style directory: a dummy-prefix SentencePiece model converted by ``transformers``
    (``LlamaTokenizer``) and saved with ``save_pretrained``, so it holds the converted ``tokenizer.json``."""
    from transformers import AutoTokenizer

    src = path.parent / f"{path.name}-src"
    src.mkdir(parents=True, exist_ok=True)
    (src / "tokenizer.model").write_bytes(sentencepiece_model(add_dummy_prefix=True))
    cfg = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": False,
        "legacy": False,
        "chat_template": MISTRAL,
    }
    (src / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    AutoTokenizer.from_pretrained(str(src), local_files_only=True).save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    """The three template families as Hugging Face tokenizer directories."""
    root = tmp_path_factory.mktemp("hf_dirs")
    return {
        "chatml": chatml_dir(root / "chatml"),
        "llama3": llama3_dir(root / "llama3"),
        "mistral": mistral_dir(root / "mistral"),
    }
