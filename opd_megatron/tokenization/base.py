"""The tokenizer interface every adapter implements (character, sentencepiece, tiktoken, HF tokenizers).

Rollouts, SFT batching and cross-tokenizer alignment only talk to :class:`Tokenizer`. Offsets are what
alignment needs: each token's ``(start, end)`` span in the text, in Python string (code point) indices,
so ``text[start:end]`` is the part of the text that token covers.

A saved tokenizer is a directory holding :data:`TOKENIZER_FILE`, a JSON object whose ``kind`` field
says which adapter reads it back (see :func:`opd_megatron.tokenization.load_tokenizer`). Checkpoints
store it beside the weights, so a run never depends on a tokenizer file outside its checkpoint.
"""

from __future__ import annotations

import abc
import json
import os
import tempfile
from pathlib import Path

__all__ = ["TOKENIZER_FILE", "Tokenizer", "TokenizerError", "write_json_atomic"]

TOKENIZER_FILE = "opd_tokenizer.json"
"""Name of the descriptor file inside a saved tokenizer directory."""


class TokenizerError(ValueError):
    """Text a tokenizer cannot encode, ids it cannot decode, or a malformed saved tokenizer."""


class Tokenizer(abc.ABC):
    """Text <-> token ids, with character offsets.

    ``encode`` never adds BOS/EOS: the caller decides (SFT batching adds them, rollouts stop on EOS).
    ``decode`` drops the special tokens (pad, BOS, EOS) by default so decoded completions are plain text.
    """

    kind: str
    """Name of the adapter, as in ``TokenizerConfig.kind``; stored in the saved descriptor."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids (ids are ``0 .. vocab_size - 1``), special tokens included."""

    @property
    @abc.abstractmethod
    def eos_id(self) -> int:
        """End of sequence: a completion ends with it and the sampler stops on it."""

    @property
    @abc.abstractmethod
    def bos_id(self) -> int | None:
        """Beginning of sequence, or ``None`` for tokenizers that have none."""

    @property
    @abc.abstractmethod
    def pad_id(self) -> int:
        """Padding; never a target of the loss."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS added)."""

    @abc.abstractmethod
    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        """Text of ``ids``; pad/BOS/EOS are dropped unless ``skip_special=False``."""

    @abc.abstractmethod
    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and, per token, its ``(start, end)`` character span in ``text``."""

    @abc.abstractmethod
    def save(self, directory: str | os.PathLike) -> Path:
        """Write the tokenizer into ``directory`` (created if needed); returns the descriptor path."""

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids that carry no text (pad, BOS, EOS)."""
        return frozenset(i for i in (self.pad_id, self.bos_id, self.eos_id) if i is not None)


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write JSON to ``path`` via a temporary file and a rename, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
