"""Train small tokenizers locally, in memory and in well under a second, for tests, demos and examples.

Three deliberately different tokenisers of the same text, like two model families would be:
SentencePiece BPE with single-digit splitting and byte fallback; a Hugging Face byte-level BPE; and a
tiktoken encoding whose ranks are converted from a byte-level BPE (numbers in groups of three).
"""

from __future__ import annotations

import io
from collections.abc import Iterable

from opd_megatron.tokenization.hf_tok import HFTokenizer, byte_to_unicode
from opd_megatron.tokenization.sentencepiece_tok import SentencePieceTokenizer
from opd_megatron.tokenization.tiktoken_tok import DEFAULT_PATTERN, TiktokenTokenizer

__all__ = [
    "CHATML_SPECIALS",
    "CHATML_THINKING_TEMPLATE",
    "DEMO_CORPUS",
    "DEMO_SPECIALS",
    "train_hf_bpe",
    "train_sentencepiece",
    "train_tiktoken",
    "write_hf_tokenizer_dir",
]

DEMO_CORPUS = (
    "The quick brown fox jumps over the lazy dog. A student learns from a teacher on its own samples.",
    "Distillation keeps the loss on positions where both tokenisations agree on a boundary.",
    "What is 12345 + 678? The answer is 13023. Then 3.14159 * 2 = 6.28318, and 1,000,000 people.",
    "def add(x, y):\n    return x + y\n\nfor i in range(10):\n    print(add(i, 2))\n",
    'if (a[i] != b[j]) { return -1; }  // compare\nx = {"key": [1, 2, 3]}\n',
    "Café, naïve, résumé, Zürich. 日本語のテキスト。中文文本。Привет, мир! 🙂👍",
    "  leading spaces\tand tabs\nand newlines\n\nand  double  spaces.",
)
"""A small mixed corpus: prose, digits, code, non-ASCII; enough for a few hundred merges."""

DEMO_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "[gMASK]",
    "<sop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
)
"""Special tokens of every built-in chat template, so one trained tokenizer can render any of them."""


def train_sentencepiece(
    corpus: Iterable[str] = DEMO_CORPUS, vocab_size: int = 400, specials: Iterable[str] = DEMO_SPECIALS
) -> SentencePieceTokenizer:
    """A SentencePiece BPE with exact offsets: identity normalisation, no dummy prefix, byte fallback,
    digits split one by one. ``specials`` become control symbols (never parsed from text)."""
    import sentencepiece as spm

    lines = [line for text in corpus for line in text.splitlines() if line]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines * 4),
        model_writer=model,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        control_symbols=[s for s in specials if s != "<|endoftext|>"],
        user_defined_symbols=["\n", "\t"],
        minloglevel=2,
    )
    return SentencePieceTokenizer(model.getvalue())


def train_hf_bpe(
    corpus: Iterable[str] = DEMO_CORPUS, vocab_size: int = 500, specials: Iterable[str] = DEMO_SPECIALS
) -> HFTokenizer:
    """A byte-level BPE (GPT-2 style, full 256-byte alphabet) with ``specials`` as added special tokens;
    EOS is the first special."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = list(specials)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus) * 4, trainer=trainer)
    return HFTokenizer(tok.to_str(), eos=specials[0])


def train_tiktoken(
    corpus: Iterable[str] = DEMO_CORPUS, vocab_size: int = 450, specials: Iterable[str] = DEMO_SPECIALS
) -> TiktokenTokenizer:
    """A tiktoken encoding whose ranks come from a byte-level BPE trained here: HF ids in merge order
    (specials dropped) renumbered to ranks ``0..n-1``, so tiktoken's lowest-rank-first merging replays the
    same merges. EOS is the first special."""
    specials = list(specials)
    hf = train_hf_bpe(corpus, vocab_size, specials=["<|endoftext|>"])
    inv = {c: b for b, c in byte_to_unicode().items()}
    by_id = sorted(
        ((p, i) for p, i in hf.tok.get_vocab().items() if i not in hf.special_ids), key=lambda kv: kv[1]
    )
    ranks = {bytes(inv[c] for c in piece): r for r, (piece, _) in enumerate(by_id)}
    return TiktokenTokenizer(ranks, specials, eos=specials[0], pattern=DEFAULT_PATTERN)


CHATML_THINKING_TEMPLATE = """\
{%- for message in messages -%}
{%- set content = message.content -%}
{%- if message.role == 'assistant' and '</think>' in content -%}
{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}
{%- endif -%}
<|im_start|>{{ message.role }}
{{ content }}<|im_end|>
{% endfor -%}
{%- if add_generation_prompt -%}
<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking is false -%}
<think>

</think>

{% endif -%}
{%- endif -%}
"""
"""A ChatML chat template with a thinking switch, in the style of Qwen3: past assistant turns lose their
reasoning, and ``enable_thinking=false`` pre-fills an empty think block in the generation prompt."""

CHATML_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")


def write_hf_tokenizer_dir(
    path,
    template: str = CHATML_THINKING_TEMPLATE,
    specials: Iterable[str] = CHATML_SPECIALS,
    config: dict | None = None,
    template_file: bool = True,
    corpus: Iterable[str] = DEMO_CORPUS,
    vocab_size: int = 500,
):
    """A Hugging Face tokenizer directory trained here: ``tokenizer.json`` (byte-level BPE),
    ``tokenizer_config.json``, and the chat template in ``chat_template.jinja`` (or, with
    ``template_file=False``, inside ``tokenizer_config.json``). ``config`` adds tokenizer_config entries
    (the ChatML default: EOS ``<|im_end|>``, pad ``<|endoftext|>``)."""
    import json
    from pathlib import Path

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = train_hf_bpe(corpus, vocab_size, specials=list(specials))
    (path / "tokenizer.json").write_text(tok.json_str, encoding="utf-8")
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast"}
    cfg.update(config if config is not None else {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
    if template_file:
        (path / "chat_template.jinja").write_text(template, encoding="utf-8")
    else:
        cfg["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return path
