"""Adapter for tiktoken byte-level BPE encodings built from a mergeable-ranks file (no downloads).

The ranks file has one ``<base64 token bytes> <rank>`` line per token (tiktoken's own format); ranks are
the token ids. Special tokens get the ids after the last rank. Text is always encoded with
``encode_ordinary``: special tokens never come from parsing text, only from :meth:`special_token_id`.
Tokens are byte sequences and may end inside a multi-byte character, so byte offsets are the exact ones.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

from opd_megatron.tokenization.base import (
    TOKENIZER_FILE,
    ByteLevelTokenizer,
    TokenizerError,
    char_spans_floor,
    write_json_atomic,
)

__all__ = ["DEFAULT_PATTERN", "TiktokenTokenizer", "read_ranks", "write_ranks"]

DEFAULT_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
"""Pre-tokenisation regex: words with their leading space, numbers in groups of up to three digits."""

_RANKS_FILE = "ranks.tiktoken"


def read_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    ranks = {}
    for n, line in enumerate(Path(path).read_text(encoding="ascii").splitlines(), 1):
        if not line.strip():
            continue
        try:
            tok, rank = line.split()
            ranks[base64.b64decode(tok, validate=True)] = int(rank)
        except ValueError as e:
            raise TokenizerError(
                f"{path}:{n}: expected '<base64 token> <rank>', got {line[:60]!r} ({e})"
            ) from None
    return ranks


def write_ranks(path: str | os.PathLike, ranks: dict[bytes, int]) -> None:
    lines = [
        f"{base64.b64encode(tok).decode('ascii')} {rank}"
        for tok, rank in sorted(ranks.items(), key=lambda x: x[1])
    ]
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="ascii")
    os.replace(tmp, path)


class TiktokenTokenizer(ByteLevelTokenizer):
    """A tiktoken ``Encoding`` over ``mergeable_ranks`` plus named special tokens.

    ``special_tokens`` lists the special token spellings; they get ids ``len(ranks) ..`` in order. ``eos``
    (required), ``bos`` and ``pad`` name some of them; pad defaults to EOS.
    """

    kind = "tiktoken"

    def __init__(
        self,
        mergeable_ranks: dict[bytes, int],
        special_tokens: list[str],
        eos: str,
        bos: str | None = None,
        pad: str | None = None,
        pattern: str = DEFAULT_PATTERN,
        name: str = "opd-local",
    ):
        import tiktoken

        if sorted(mergeable_ranks.values()) != list(range(len(mergeable_ranks))):
            raise TokenizerError("mergeable ranks must be the ids 0 .. n-1, each once")
        for tok in (eos, bos, pad):
            if tok is not None and tok not in special_tokens:
                raise TokenizerError(f"{tok!r} is not one of the special tokens {special_tokens}")
        self.ranks = dict(mergeable_ranks)
        self.specials = {t: len(self.ranks) + k for k, t in enumerate(dict.fromkeys(special_tokens))}
        self.eos_token, self.bos_token, self.pad_token, self.pattern = eos, bos, pad, pattern
        self.enc = tiktoken.Encoding(
            name, pat_str=pattern, mergeable_ranks=self.ranks, special_tokens=self.specials
        )
        self._special_text = {i: t for t, i in self.specials.items()}

    @property
    def vocab_size(self) -> int:
        return len(self.ranks) + len(self.specials)

    @property
    def eos_id(self) -> int:
        return self.specials[self.eos_token]

    @property
    def bos_id(self) -> int | None:
        return None if self.bos_token is None else self.specials[self.bos_token]

    @property
    def pad_id(self) -> int:
        return self.specials[self.pad_token or self.eos_token]

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(self._special_text)

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        ids, byte_spans = self.encode_with_byte_offsets(text)
        return ids, char_spans_floor(text, byte_spans)

    def token_bytes(self, ids: list[int]) -> list[bytes]:
        out = []
        for pos, i in enumerate(ids):
            i = int(i)
            if i in self._special_text:
                out.append(b"")
            elif 0 <= i < len(self.ranks):
                out.append(self.enc.decode_single_token_bytes(i))
            else:
                raise TokenizerError(
                    f"token id {i} at position {pos} is outside the vocabulary [0, {self.vocab_size})"
                )
        return out

    def special_token_id(self, token: str) -> int:
        if token in self.specials:
            return self.specials[token]
        return super().special_token_id(token)

    def special_token_text(self, token_id: int) -> str | None:
        return self._special_text.get(int(token_id))

    def save(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_ranks(directory / _RANKS_FILE, self.ranks)
        path = directory / TOKENIZER_FILE
        write_json_atomic(
            path,
            {
                "kind": self.kind,
                "version": 1,
                "ranks_file": _RANKS_FILE,
                "pattern": self.pattern,
                "special_tokens": list(self.specials),
                "eos": self.eos_token,
                "bos": self.bos_token,
                "pad": self.pad_token,
            },
        )
        return path

    @classmethod
    def from_dict(cls, data: dict, source: str = "tokenizer descriptor") -> TiktokenTokenizer:
        ranks = Path(source).parent / str(data.get("ranks_file", _RANKS_FILE))
        if not ranks.is_file():
            raise TokenizerError(f"{source}: tiktoken ranks file {ranks.name!r} is missing")
        try:
            return cls(
                read_ranks(ranks),
                special_tokens=list(data["special_tokens"]),
                eos=data["eos"],
                bos=data.get("bos"),
                pad=data.get("pad"),
                pattern=data.get("pattern", DEFAULT_PATTERN),
            )
        except KeyError as e:
            raise TokenizerError(f"{source}: missing field {e}") from None

    def __repr__(self) -> str:
        return f"TiktokenTokenizer(vocab_size={self.vocab_size})"
