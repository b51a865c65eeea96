"""Tokenizers: the :class:`Tokenizer` interface, the built-in character tokenizer and a loader."""

from __future__ import annotations

import json
import os
from pathlib import Path

from opd_megatron.config import ConfigError, TokenizerConfig
from opd_megatron.tokenization.base import TOKENIZER_FILE, Tokenizer, TokenizerError
from opd_megatron.tokenization.char import CharTokenizer

__all__ = ["TOKENIZER_FILE", "CharTokenizer", "Tokenizer", "TokenizerError", "load_tokenizer"]

_LOADERS = {"char": CharTokenizer.from_dict}
"""Adapters that exist so far, by ``TokenizerConfig.kind``; each reads a saved descriptor."""


def load_tokenizer(source: TokenizerConfig | str | os.PathLike) -> Tokenizer:
    """Build the tokenizer a config asks for, or load one saved with :meth:`Tokenizer.save`.

    ``source`` is a :class:`TokenizerConfig`, a saved tokenizer directory (e.g. a checkpoint), or the
    descriptor file inside one. For ``kind="char"`` a config gives the default character vocabulary,
    unless ``path`` points at a saved one.
    """
    if isinstance(source, TokenizerConfig):
        if source.kind not in _LOADERS:
            raise ConfigError(
                "tokenizer.kind",
                f"tokenizer kind {source.kind!r} is not available yet; supported: {', '.join(map(repr, _LOADERS))}",
            )
        if source.path is None:
            return CharTokenizer()
        return load_tokenizer(source.path)

    path = Path(source)
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
            f"{path}: tokenizer kind {kind!r} is not supported; supported: {', '.join(map(repr, _LOADERS))}"
        )
    return _LOADERS[kind](data, source=str(path))
