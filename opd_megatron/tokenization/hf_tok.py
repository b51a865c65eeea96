"""Adapter for Hugging Face ``tokenizers`` JSON files (``tokenizer.json``), read locally.

Text is encoded with ``encode_special_tokens`` on, so added special tokens are never parsed out of text
(they come only from :meth:`special_token_id`), and without the post-processor's BOS/EOS. For byte-level
models (a ``ByteLevel`` decoder) each token's bytes are read off its vocabulary string through the
byte <-> printable-character map, so byte offsets stay exact when a token ends inside a character.
For other decoders a token's bytes are its text decoded on its own, which is exact for most vocabularies
but can drop a space that a decoder only inserts between tokens (e.g. WordPiece ``##`` handling).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from opd_megatron.tokenization.base import (
    TOKENIZER_FILE,
    ByteLevelTokenizer,
    TokenizerError,
    char_spans_floor,
    table_bytes,
    write_json_atomic,
)

__all__ = ["EOS_CANDIDATES", "HFTokenizer", "byte_to_unicode"]

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>", "<|eot_id|>")
"""Special tokens tried, in order, as EOS when a ``tokenizer.json`` is loaded without naming one."""

_JSON_FILE = "tokenizer.json"


def byte_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet: every byte as one printable character.

    Printable Latin-1 bytes map to themselves; the other 68 bytes (controls, space, a few others) map to
    ``chr(256 + k)`` in byte order, so no token string contains whitespace or control characters."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class HFTokenizer(ByteLevelTokenizer):
    """A ``tokenizers.Tokenizer``; ``eos``/``bos``/``pad`` name special tokens of its vocabulary."""

    kind = "hf"

    def __init__(self, json_str: str, eos: str | None = None, bos: str | None = None, pad: str | None = None):
        from tokenizers import Tokenizer as _HF

        self.json_str = json_str
        self.tok = _HF.from_str(json_str)
        self.tok.encode_special_tokens = True  # literal "<|im_start|>" in text stays text
        added = [t for t in self.tok.get_added_tokens_decoder().values() if t.special]
        self._special_text = {self.tok.token_to_id(t.content): t.content for t in added}
        self._special_id = {t: i for i, t in self._special_text.items()}
        if eos is None:
            eos = next((t for t in EOS_CANDIDATES if t in self._special_id), None)
            if eos is None:
                raise TokenizerError(
                    f"tokenizer.json names no EOS; pass one of its special tokens {list(self._special_id)}"
                )
        for t in (eos, bos, pad):
            if t is not None and t not in self._special_id:
                raise TokenizerError(
                    f"{t!r} is not a special token of this tokenizer ({list(self._special_id)})"
                )
        self.eos_token, self.bos_token, self.pad_token = eos, bos, pad
        decoder = (json.loads(json_str).get("decoder") or {}).get("type")
        inv = {c: b for b, c in byte_to_unicode().items()}
        vocab = self.tok.get_vocab(with_added_tokens=True)
        self._bytes: list[bytes] = [b""] * self.tok.get_vocab_size(with_added_tokens=True)
        for piece, i in vocab.items():
            if i in self._special_text:
                continue
            if decoder == "ByteLevel":
                self._bytes[i] = (
                    bytes(inv[c] for c in piece) if all(c in inv for c in piece) else piece.encode()
                )
            else:
                self._bytes[i] = self.tok.decode([i], skip_special_tokens=False).encode("utf-8")

    @classmethod
    def from_file(cls, path: str | os.PathLike, **names) -> HFTokenizer:
        return cls(Path(path).read_text(encoding="utf-8"), **names)

    @property
    def vocab_size(self) -> int:
        return len(self._bytes)

    @property
    def eos_id(self) -> int:
        return self._special_id[self.eos_token]

    @property
    def bos_id(self) -> int | None:
        return None if self.bos_token is None else self._special_id[self.bos_token]

    @property
    def pad_id(self) -> int:
        return self._special_id[self.pad_token or self.eos_token]

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(self._special_text)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        ids, byte_spans = self.encode_with_byte_offsets(text)
        return ids, char_spans_floor(text, byte_spans)

    def token_bytes(self, ids: list[int]) -> list[bytes]:
        return table_bytes(self._bytes, ids)

    def special_token_id(self, token: str) -> int:
        if token in self._special_id:
            return self._special_id[token]
        return super().special_token_id(token)

    def special_token_text(self, token_id: int) -> str | None:
        return self._special_text.get(int(token_id))

    def save(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{_JSON_FILE}.tmp"
        tmp.write_text(self.json_str, encoding="utf-8")
        os.replace(tmp, directory / _JSON_FILE)
        path = directory / TOKENIZER_FILE
        write_json_atomic(
            path,
            {
                "kind": self.kind,
                "version": 1,
                "json_file": _JSON_FILE,
                "eos": self.eos_token,
                "bos": self.bos_token,
                "pad": self.pad_token,
            },
        )
        return path

    @classmethod
    def from_dict(cls, data: dict, source: str = "tokenizer descriptor") -> HFTokenizer:
        path = Path(source).parent / str(data.get("json_file", _JSON_FILE))
        if not path.is_file():
            raise TokenizerError(f"{source}: tokenizer file {path.name!r} is missing")
        return cls.from_file(path, eos=data.get("eos"), bos=data.get("bos"), pad=data.get("pad"))

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size})"
