"""Adapter for Hugging Face ``tokenizers`` JSON files (``tokenizer.json``), read locally.

Text is encoded with ``encode_special_tokens`` on, so added special tokens are never parsed out of text
(they come only from :meth:`special_token_id`), and without the post-processor's BOS/EOS. For byte-level
models (a ``ByteLevel`` decoder) each token's bytes are read off its vocabulary string through the
byte <-> printable-character map, so byte offsets stay exact when a token ends inside a character.
SentencePiece-style models (a ``Metaspace`` pre-tokenizer or a ``Prepend("▁")`` normaliser, as in the
Llama-2 / Mistral conversions) spell a space as ``"▁"`` and unknown bytes as ``<0xNN>`` pieces; their
bytes are read off the piece the same way, and a prepended ``"▁"`` is the
:attr:`~opd_megatron.tokenization.base.Tokenizer.dummy_prefix` (removed from the text, never attributed
to it; see :mod:`~opd_megatron.tokenization.sentencepiece_tok`). For other decoders a token's bytes are
its text decoded on its own, which is exact for most vocabularies but can drop a space that a decoder
only inserts between tokens (e.g. WordPiece ``##`` handling).

A tokenizer loaded from a Hugging Face tokenizer *directory* (:mod:`~opd_megatron.tokenization.hf_dir`)
also carries the model's own chat template (:attr:`HFTokenizer.chat`) and keeps the directory's files
when saved.
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
        spec = json.loads(json_str)
        decoder = (spec.get("decoder") or {}).get("type")
        meta, self.dummy_prefix = _metaspace(spec)
        byte_fallback = bool((spec.get("model") or {}).get("byte_fallback"))
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
            elif byte_fallback and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                self._bytes[i] = bytes([int(piece[3:5], 16)])
            elif meta is not None:
                self._bytes[i] = piece.replace(meta, " ").encode("utf-8")
            else:
                self._bytes[i] = self.tok.decode([i], skip_special_tokens=False).encode("utf-8")

    chat = None
    """The model's own chat template (:class:`~opd_megatron.tokenization.jinja_template.JinjaChatTemplate`)
    when loaded from a Hugging Face tokenizer directory, else ``None``."""
    hf_dir: Path | None = None
    """The Hugging Face tokenizer directory this tokenizer was loaded from, if any."""

    def special_texts(self) -> list[str]:
        """Spellings of the special tokens."""
        return list(self._special_id)

    def encode_parsing_specials(self, text: str) -> list[int]:
        """Token ids of ``text`` with special tokens spelled in it turned into their ids (the way
        ``transformers`` tokenises a rendered chat template); :meth:`encode` never does that."""
        if getattr(self, "_parse_tok", None) is None:
            from tokenizers import Tokenizer as _HF

            self._parse_tok = _HF.from_str(self.json_str)
            self._parse_tok.encode_special_tokens = False
        return self._parse_tok.encode(text, add_special_tokens=False).ids

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
        if self.hf_dir is not None:
            from opd_megatron.tokenization.hf_dir import save_hf_directory

            return save_hf_directory(self, directory)
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
        if data.get("hf_dir"):
            from opd_megatron.tokenization.hf_dir import load_hf_directory

            return load_hf_directory(Path(source).parent / str(data["hf_dir"]))
        path = Path(source).parent / str(data.get("json_file", _JSON_FILE))
        if not path.is_file():
            raise TokenizerError(f"{source}: tokenizer file {path.name!r} is missing")
        return cls.from_file(path, eos=data.get("eos"), bos=data.get("bos"), pad=data.get("pad"))

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size})"


def _metaspace(spec: dict) -> tuple[str | None, bytes]:
    """The meta-space character of a SentencePiece-style ``tokenizer.json`` (``None`` if it has none) and
    its dummy prefix: ``b" "`` when a ``"▁"`` is prepended to the text (``Metaspace`` with
    ``prepend_scheme`` ``first``/``always`` or the older ``add_prefix_space``, or a ``Prepend`` normaliser)."""

    def parts(node):
        if not node:
            return []
        inner = node.get("pretokenizers") or node.get("normalizers")
        return [p for n in inner for p in parts(n)] if inner else [node]

    meta, prefix = None, b""
    for node in parts(spec.get("pre_tokenizer")):
        if node.get("type") == "Metaspace":
            meta = node.get("replacement", "\u2581")
            if (
                node.get("prepend_scheme", "always" if node.get("add_prefix_space", True) else "never")
                != "never"
            ):
                prefix = b" "
    for node in parts(spec.get("normalizer")):
        if node.get("type") == "Prepend" and node.get("prepend"):
            meta, prefix = node["prepend"], b" "
        if node.get("type") == "Replace" and (node.get("pattern") or {}).get("String") == " ":
            meta = node.get("content", meta)
    return meta, prefix
