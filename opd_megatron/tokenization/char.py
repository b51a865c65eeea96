"""The character tokenizer of the built-in synthetic domains: one token per character.

The vocabulary is a fixed constant, not learned from data, so every run (and every checkpoint) that uses
the default gets the same ids. Ids: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<unk>`` 3, then the
characters of :data:`DEFAULT_CHARS` in order (64 ids in all, a power of two so tensor-parallel vocab
shards divide it evenly). A saved tokenizer stores its character list, so a checkpoint keeps decoding
with the vocabulary it was trained with even if the default ever grows.
"""

from __future__ import annotations

import os
from pathlib import Path

from opd_megatron.tokenization.base import TOKENIZER_FILE, Tokenizer, TokenizerError, write_json_atomic

__all__ = ["DEFAULT_CHARS", "SPECIAL_TOKENS", "CharTokenizer"]

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
"""Special tokens, ids 0..3 in this order."""

DEFAULT_CHARS = "\n " + "0123456789" + "abcdefghijklmnopqrstuvwxyz" + "!\"#%'()*+,-./:;<=>?[]_"
"""Every character the built-in domains produce (prompts, answers, privileged hints), plus common
punctuation for small hand-written JSONL prompts. Append only: reordering would change ids."""

_FORMAT_VERSION = 1


class CharTokenizer(Tokenizer):
    """One id per character of a fixed character list, after the four special tokens."""

    kind = "char"

    def __init__(self, chars: str = DEFAULT_CHARS):
        if len(set(chars)) != len(chars):
            dup = sorted({c for c in chars if chars.count(c) > 1})
            raise TokenizerError(f"character list has duplicates: {', '.join(map(repr, dup))}")
        if not chars:
            raise TokenizerError("character list is empty")
        self.chars = chars
        self._n_special = len(SPECIAL_TOKENS)
        self._char_to_id = {c: i + self._n_special for i, c in enumerate(chars)}

    # ids -------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._n_special + len(self.chars)

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def bos_id(self) -> int:
        return 1

    @property
    def eos_id(self) -> int:
        return 2

    @property
    def unk_id(self) -> int:
        """Stands for a character outside the vocabulary (only with ``errors="replace"``)."""
        return 3

    # encode / decode -------------------------------------------------------------------------------
    def encode(self, text: str, errors: str = "strict") -> list[int]:
        """One id per character. An unknown character raises :class:`TokenizerError` naming it and its
        position, because silently mapping it to ``<unk>`` would train on corrupted prompts; pass
        ``errors="replace"`` to map it to ``<unk>`` instead."""
        if errors not in ("strict", "replace"):
            raise ValueError(f"errors must be 'strict' or 'replace', got {errors!r}")
        lookup = self._char_to_id
        try:
            return [lookup[c] for c in text]
        except KeyError:
            if errors == "replace":
                return [lookup.get(c, self.unk_id) for c in text]
            raise self._oov_error(text) from None

    def encode_with_offsets(
        self, text: str, errors: str = "strict"
    ) -> tuple[list[int], list[tuple[int, int]]]:
        ids = self.encode(text, errors=errors)
        return ids, [(i, i + 1) for i in range(len(text))]

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        out = []
        n = self._n_special
        for pos, i in enumerate(ids):
            i = int(i)  # accept tensor elements and numpy ints
            if not 0 <= i < self.vocab_size:
                raise TokenizerError(
                    f"token id {i} at position {pos} is outside the vocabulary [0, {self.vocab_size})"
                )
            if i >= n:
                out.append(self.chars[i - n])
            elif i == self.unk_id:
                out.append("\ufffd")  # the unicode replacement character: a character was lost here
            elif not skip_special:
                out.append(SPECIAL_TOKENS[i])
        return "".join(out)

    def _oov_error(self, text: str) -> TokenizerError:
        pos, ch = next((p, c) for p, c in enumerate(text) if c not in self._char_to_id)
        context = text[max(0, pos - 15) : pos + 15]
        return TokenizerError(
            f"character {ch!r} (U+{ord(ch):04X}) at position {pos} is not in the char tokenizer's vocabulary "
            f"(near {context!r}); pass errors='replace' to map unknown characters to <unk>"
        )

    # persistence -----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "version": _FORMAT_VERSION,
            "special_tokens": list(SPECIAL_TOKENS),
            "chars": self.chars,
        }

    @classmethod
    def from_dict(cls, data: dict, source: str = "tokenizer descriptor") -> CharTokenizer:
        if data.get("kind") != cls.kind:
            raise TokenizerError(f"{source}: kind is {data.get('kind')!r}, expected 'char'")
        if data.get("version") != _FORMAT_VERSION:
            raise TokenizerError(f"{source}: unsupported char tokenizer version {data.get('version')!r}")
        if data.get("special_tokens") != list(SPECIAL_TOKENS):
            raise TokenizerError(
                f"{source}: special tokens {data.get('special_tokens')!r} != {list(SPECIAL_TOKENS)}"
            )
        chars = data.get("chars")
        if not isinstance(chars, str):
            raise TokenizerError(f"{source}: 'chars' must be a string, got {type(chars).__name__}")
        try:
            return cls(chars)
        except TokenizerError as e:
            raise TokenizerError(f"{source}: {e}") from None

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / TOKENIZER_FILE
        write_json_atomic(path, self.to_dict())
        return path

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and other.chars == self.chars

    def __hash__(self) -> int:
        return hash((self.kind, self.chars))

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"
