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

__all__ = [
    "TOKENIZER_FILE",
    "Tokenizer",
    "TokenizerError",
    "char_offsets_from_bytes",
    "char_spans_floor",
    "spans_from_lengths",
    "write_json_atomic",
]

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
        """Ids that carry no text (pad, BOS, EOS, and any other special/control token)."""
        return frozenset(i for i in (self.pad_id, self.bos_id, self.eos_id) if i is not None)

    # Byte-level view, used by cross-tokenizer alignment. Adapters of byte-level tokenizers override
    # these: their tokens may end inside a multi-byte character, so only byte offsets are exact.
    def token_bytes(self, ids: list[int]) -> list[bytes]:
        """The UTF-8 bytes each token contributes to the text (``b""`` for special tokens).

        Works on *any* id sequence, not only canonical encodings: a sampled rollout may tokenise its text
        differently from :meth:`encode`, and alignment must use the tokens the student actually produced.
        """
        special = self.special_ids
        return [b"" if int(i) in special else self.decode([int(i)]).encode("utf-8") for i in ids]

    dummy_prefix: bytes = b""
    """What :meth:`encode` puts in front of the text before tokenising it: ``b" "`` for SentencePiece models
    with ``add_dummy_prefix`` (Llama-2, Mistral, Gemma style, and their Hugging Face ``Metaspace``
    conversions), so that ``encode("The")`` is ``["▁The"]``. The dummy space is no part of the text: the
    model's ``decode`` removes it, and so do :meth:`decode` and :meth:`text_bytes` here."""

    def text_bytes(self, ids: list[int]) -> list[bytes]:
        """:meth:`token_bytes` of ``ids`` read as the start of a text (a prompt, a completion): the
        :attr:`dummy_prefix` is removed from the first token that has bytes (that token may become
        ``b""``), so the bytes join to the text ``decode`` gives, and byte offsets of an encoding line up
        with the original text. :meth:`token_bytes` stays per token (``"▁The"`` is ``b" The"``)."""
        out = self.token_bytes(ids)
        if self.dummy_prefix:
            for k, b in enumerate(out):
                if b:
                    if b.startswith(self.dummy_prefix):
                        out[k] = b[len(self.dummy_prefix) :]
                    break
        return out

    def encode_with_byte_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and, per token, its ``(start, end)`` span in ``text.encode("utf-8")``."""
        ids = self.encode(text)
        return ids, spans_from_lengths([len(b) for b in self.bytes_of_encoding(text, ids)])

    def bytes_of_encoding(self, text: str, ids: list[int]) -> list[bytes]:
        """Per-token bytes of ``ids``, an encoding of ``text``, so that they join to ``text``: the dummy
        prefix is removed exactly when the tokenizer added one. (SentencePiece always adds it; Hugging
        Face's ``Metaspace`` does not when the text already starts with a space, and then the first
        token's ``"▁"`` is the text's own space, which :meth:`text_bytes`, reading ids alone, cannot tell.)"""
        out = self.token_bytes(ids)
        if self.dummy_prefix and b"".join(out) == self.dummy_prefix + text.encode("utf-8"):
            return self.text_bytes(ids)
        return out

    def special_token_id(self, token: str) -> int:
        """Id of the special token spelled ``token`` (e.g. ``"<|im_start|>"``); raises if there is none.

        Special tokens are only ever produced by id, never by parsing text, so user content that merely
        spells a special token stays text (see :mod:`opd_megatron.tokenization.chat_templates`)."""
        raise TokenizerError(f"{type(self).__name__} has no special token {token!r}")

    def special_token_text(self, token_id: int) -> str | None:
        """Spelling of special token ``token_id``, or ``None`` if the id is not a special token."""
        return None


class ByteLevelTokenizer(Tokenizer):
    """An adapter whose text is exactly the concatenation of its tokens' bytes (sentencepiece with byte
    fallback, tiktoken, byte-level HF BPE): decoding joins :meth:`token_bytes`, so decode and alignment
    can never disagree about what a token spells."""

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        pieces = self.text_bytes(ids)
        if not skip_special:
            spelled = [self.special_token_text(int(i)) for i in ids]
            pieces = [b if text is None else text.encode() for b, text in zip(pieces, spelled)]
        return b"".join(pieces).decode("utf-8", errors="replace")


def table_bytes(table: list[bytes], ids: list[int]) -> list[bytes]:
    """``table[i]`` for each id, with a clear error for an id outside the vocabulary."""
    n = len(table)
    for pos, i in enumerate(ids):
        if not 0 <= int(i) < n:
            raise TokenizerError(f"token id {int(i)} at position {pos} is outside the vocabulary [0, {n})")
    return [table[int(i)] for i in ids]


def spans_from_lengths(lengths: list[int]) -> list[tuple[int, int]]:
    """Consecutive ``(start, end)`` spans of pieces with the given lengths, starting at 0."""
    spans, pos = [], 0
    for n in lengths:
        spans.append((pos, pos + n))
        pos += n
    return spans


def char_offsets_from_bytes(text: str, byte_spans: list[tuple[int, int]]) -> list[tuple[int, int] | None]:
    """Character spans for byte spans of ``text.encode("utf-8")``; ``None`` where a span starts or ends
    inside a multi-byte character (byte-level tokens may split one)."""
    byte_to_char = {}
    pos = 0
    for ci, ch in enumerate(text):
        byte_to_char[pos] = ci
        pos += len(ch.encode("utf-8"))
    byte_to_char[pos] = len(text)
    out = []
    for s, e in byte_spans:
        cs, ce = byte_to_char.get(s), byte_to_char.get(e)
        out.append(None if cs is None or ce is None else (cs, ce))
    return out


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


def char_spans_floor(text: str, byte_spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Character spans for byte spans, each byte offset rounded down to the start of its character.

    A token that ends inside a multi-byte character is credited with none of it and the token that
    completes the character covers all of it, so ``text[start:end]`` always is valid text and the spans
    still tile the text (some may be empty)."""
    floor = []
    for ci, ch in enumerate(text):
        floor.extend([ci] * len(ch.encode("utf-8")))
    floor.append(len(text))
    return [(floor[s], floor[e]) for s, e in byte_spans]
