"""Hugging Face tokenizer directories (``tokenizer.json`` + ``tokenizer_config.json`` and/or
``chat_template.jinja``, as a model repository has them), read locally through ``transformers``.

:func:`load_hf_directory` loads the directory with ``AutoTokenizer.from_pretrained(...,
local_files_only=True)``, so special tokens, the tokenizer class's own settings and the chat template are
what ``transformers`` makes of them; the project's :class:`~opd_megatron.tokenization.hf_tok.HFTokenizer`
is built from that tokenizer's backend (so its ids equal ``transformers``' ids) with the directory's EOS,
BOS and pad tokens, and carries the chat template (:class:`~opd_megatron.tokenization.jinja_template.
JinjaChatTemplate`) when the directory has one. :func:`save_hf_directory` copies the directory's tokenizer
files into a saved tokenizer (a checkpoint's), so it reloads the same way without the original directory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from opd_megatron.tokenization.base import TOKENIZER_FILE, TokenizerError, write_json_atomic

__all__ = ["HF_TOKENIZER_FILES", "is_hf_directory", "load_hf_directory", "save_hf_directory"]

HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
"""Files of a Hugging Face tokenizer directory that a saved copy keeps (those that exist)."""

_SAVED_DIR = "hf"


def is_hf_directory(path: str | os.PathLike) -> bool:
    """A directory with a Hugging Face ``tokenizer.json`` or ``tokenizer_config.json``."""
    p = Path(path)
    return p.is_dir() and ((p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file())


def _name(token) -> str | None:
    return None if token is None else str(token)


def load_hf_directory(path: str | os.PathLike):
    """The tokenizer of a Hugging Face tokenizer directory, with its chat template (if it has one)."""
    from opd_megatron.tokenization.hf_tok import HFTokenizer
    from opd_megatron.tokenization.jinja_template import JinjaChatTemplate

    path = Path(path)
    if not is_hf_directory(path):
        raise TokenizerError(
            f"{path}: not a Hugging Face tokenizer directory (no tokenizer.json / tokenizer_config.json)"
        )
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise TokenizerError(
            f"{path}: reading a Hugging Face tokenizer directory needs `transformers` installed"
        ) from None
    try:
        hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises many types for a broken directory
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TokenizerError(f"{path}: transformers cannot load this tokenizer: {msg}") from None
    backend = getattr(hf, "_tokenizer", None)
    if backend is None:
        raise TokenizerError(
            f"{path}: {type(hf).__name__} has no `tokenizers` backend (a fast tokenizer is needed)"
        )
    tok = HFTokenizer(
        backend.to_str(), eos=_name(hf.eos_token), bos=_name(hf.bos_token), pad=_name(hf.pad_token)
    )
    tok.hf_dir = path
    if getattr(hf, "chat_template", None):
        source = path / "chat_template.jinja"
        tok.chat = JinjaChatTemplate(
            hf, tok, str(source if source.is_file() else path / "tokenizer_config.json")
        )
    return tok


def save_hf_directory(tok, directory: Path) -> Path:
    """Copy ``tok.hf_dir``'s tokenizer files into ``directory/hf`` (atomically) and write the descriptor."""
    target = directory / _SAVED_DIR
    tmp = Path(tempfile.mkdtemp(dir=directory, prefix=f".{_SAVED_DIR}."))
    try:
        for name in HF_TOKENIZER_FILES:
            if (tok.hf_dir / name).is_file():
                shutil.copyfile(tok.hf_dir / name, tmp / name)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    path = directory / TOKENIZER_FILE
    write_json_atomic(path, {"kind": "hf", "version": 2, "hf_dir": _SAVED_DIR})
    return path
