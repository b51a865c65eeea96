"""Tokenizers: the :class:`Tokenizer` interface, adapters and a loader; cross-tokenizer machinery.

Modules: ``char`` (built-in), ``sentencepiece_tok`` / ``tiktoken_tok`` / ``hf_tok`` (adapters with byte
offsets), ``train_local`` (small tokenizers trained in memory), ``chat_templates`` (render, strip,
re-emit), ``alignment`` (boundary agreement), ``cross`` (batch plan for a teacher of another tokenizer),
``cli`` (the ``align`` inspector), ``hf_dir`` (Hugging Face tokenizer directories) and ``jinja_template``
(the model's own chat template). The ULD losses live in :mod:`opd_megatron.losses.uld`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from opd_megatron.config import ConfigError, TokenizerConfig
from opd_megatron.tokenization.base import TOKENIZER_FILE, Tokenizer, TokenizerError
from opd_megatron.tokenization.char import CharTokenizer

__all__ = ["TOKENIZER_FILE", "CharTokenizer", "Tokenizer", "TokenizerError", "load_tokenizer"]


def _adapter(kind: str):
    # Imported lazily: each adapter pulls in its own tokenizer library.
    if kind == "sentencepiece":
        from opd_megatron.tokenization.sentencepiece_tok import SentencePieceTokenizer

        return SentencePieceTokenizer
    if kind == "tiktoken":
        from opd_megatron.tokenization.tiktoken_tok import TiktokenTokenizer

        return TiktokenTokenizer
    if kind == "hf":
        from opd_megatron.tokenization.hf_tok import HFTokenizer

        return HFTokenizer
    return CharTokenizer


_LOADERS = {"char", "sentencepiece", "tiktoken", "hf"}
"""Adapters by ``TokenizerConfig.kind``; each reads a saved descriptor with ``from_dict``."""


def load_tokenizer(source: TokenizerConfig | str | os.PathLike) -> Tokenizer:
    """Build the tokenizer a config asks for, or load one saved with :meth:`Tokenizer.save`.

    ``source`` is a :class:`TokenizerConfig`, a saved tokenizer directory (e.g. a checkpoint), or the
    descriptor file inside one. For ``kind="char"`` a config gives the default character vocabulary,
    unless ``path`` points at a saved one. For the other kinds ``path`` is a saved directory, or the
    tokenizer's own file: a SentencePiece ``.model``, a tiktoken ranks file (default pre-tokenisation
    pattern; special tokens ``<|endoftext|>`` (EOS) then those of ``chat_template``, after the ranks),
    an HF ``tokenizer.json`` (EOS: the first of :data:`~opd_megatron.tokenization.hf_tok.EOS_CANDIDATES`),
    or a Hugging Face tokenizer directory (``tokenizer.json`` + ``tokenizer_config.json``, with the model's
    chat template; see :mod:`~opd_megatron.tokenization.hf_dir`).
    """
    if isinstance(source, TokenizerConfig):
        if source.kind not in _LOADERS:
            raise ConfigError(
                "tokenizer.kind",
                f"tokenizer kind {source.kind!r} is not available; supported: {', '.join(map(repr, sorted(_LOADERS)))}",
            )
        if source.path is None:
            return CharTokenizer()
        path = Path(source.path)
        if source.kind == "char" or path.is_dir() or path.name == TOKENIZER_FILE:
            return load_tokenizer(path)
        if not path.is_file():
            raise ConfigError("tokenizer.path", f"no tokenizer file at {path}")
        cls = _adapter(source.kind)
        if source.kind == "tiktoken":
            from opd_megatron.tokenization.chat_templates import get_template
            from opd_megatron.tokenization.tiktoken_tok import read_ranks

            specials = ["<|endoftext|>", *get_template(source.chat_template).special_tokens]
            return cls(read_ranks(path), list(dict.fromkeys(specials)), eos="<|endoftext|>")
        return cls.from_file(path)

    path = Path(source)
    if path.is_dir() and not (path / TOKENIZER_FILE).is_file():
        from opd_megatron.tokenization.hf_dir import is_hf_directory, load_hf_directory

        if is_hf_directory(path):
            return load_hf_directory(path)
    if (
        path.is_dir()
        and not (path / TOKENIZER_FILE).is_file()
        and (path / "tokenizer" / TOKENIZER_FILE).is_file()
    ):
        path = path / "tokenizer"  # a checkpoint directory: its tokenizer is saved beside the weights
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no saved tokenizer at {path} (expected {TOKENIZER_FILE} written by save())")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    kind = data.get("kind")
    if kind not in _LOADERS:
        raise TokenizerError(
            f"{path}: tokenizer kind {kind!r} is not supported; supported: {', '.join(map(repr, sorted(_LOADERS)))}"
        )
    return _adapter(kind).from_dict(data, source=str(path))
