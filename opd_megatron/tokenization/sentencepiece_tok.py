"""Adapter for SentencePiece models (BPE or unigram), loaded from ``.model`` bytes.

Offsets come from SentencePiece's own piece spans (UTF-8 byte offsets into the input). For those to be
exact spans of the *original* text the model must use the ``identity`` normaliser, as the models of
:mod:`opd_megatron.tokenization.train_local` do; with another normaliser (NFKC, whitespace collapsing) the
offsets and per-token bytes follow the normalised text.

**Dummy prefix** (``add_dummy_prefix``, the Llama-2 / Mistral / Gemma default): SentencePiece encodes
``" " + text``, so ``encode("The fox")`` is ``["▁The", "▁fox"]``. Here the dummy space is removed, never
attributed to the text: :attr:`dummy_prefix` is ``b" "``, the first piece of an encoding covers
``"The"`` (offsets ``(0, 3)``, as SentencePiece reports them), and :meth:`text_bytes` / :meth:`decode`
drop one leading space from the first piece of a sequence, as SentencePiece's own decoder does; a lone
``"▁"`` dummy piece then covers no bytes. :meth:`token_bytes` keeps the per-token view (``"▁fox"`` is
``b" fox"``). Alignment against a byte-level tokenizer therefore sees the same text on both sides.

Control symbols (chat-template tokens) are never parsed from text: SentencePiece only produces them by
id, which is what keeps user content that spells ``<|im_start|>`` plain text.
"""

from __future__ import annotations

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

__all__ = ["SentencePieceTokenizer"]

_MODEL_FILE = "tokenizer.model"


class SentencePieceTokenizer(ByteLevelTokenizer):
    """A SentencePiece model; ``model_proto`` is the serialised model (the ``.model`` file's bytes)."""

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm

        self.model_proto = bytes(model_proto)
        self.sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
        sp = self.sp
        if sp.eos_id() < 0:
            raise TokenizerError("sentencepiece model has no EOS piece (eos_id < 0)")
        # Special: control pieces (BOS/EOS/template tokens), the unknown piece (it has no recoverable text,
        # so a sampled <unk> must not silently vanish from re-emitted text) and pad.
        self._special = frozenset(
            i for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)
        ) | frozenset(i for i in (sp.bos_id(), sp.eos_id(), sp.pad_id()) if i >= 0)
        self._control = {sp.id_to_piece(i): i for i in range(sp.get_piece_size()) if sp.is_control(i)}
        # Bytes of every piece, computed once: "▁" is the space, "<0xNN>" byte-fallback pieces are one byte.
        self._bytes = [self._piece_bytes(i) for i in range(sp.get_piece_size())]
        # The model's normaliser spec is not exposed without protobuf; its effect is: a dummy prefix turns
        # "a" into a piece sequence that starts with the meta space.
        self.dummy_prefix = b" " if "".join(sp.encode("a", out_type=str)).startswith("\u2581") else b""

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> SentencePieceTokenizer:
        return cls(Path(path).read_bytes())

    def _piece_bytes(self, i: int) -> bytes:
        sp = self.sp
        if i in self._special or sp.is_control(i) or sp.is_unknown(i):
            return b""
        piece = sp.id_to_piece(i)
        if sp.is_byte(i):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode("utf-8")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def bos_id(self) -> int | None:
        return self.sp.bos_id() if self.sp.bos_id() >= 0 else None

    @property
    def pad_id(self) -> int:
        # Models without a pad piece pad with EOS; pad positions are never loss targets anyway.
        return self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id

    @property
    def special_ids(self) -> frozenset[int]:
        return self._special

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def encode_with_byte_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        proto = self.sp.encode(text, return_type="proto")
        ids = [p.id for p in proto.pieces]
        # SentencePiece gives a multi-byte character split into byte pieces the whole character span on
        # its last byte piece; give each byte piece its own byte instead, so spans tile the text.
        spans, pos = [], 0
        for p in proto.pieces:
            n = len(self._bytes[p.id]) if self.sp.is_byte(p.id) else p.end - pos
            spans.append((pos, pos + n))
            pos += n
        return ids, spans

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        ids, byte_spans = self.encode_with_byte_offsets(text)
        return ids, char_spans_floor(text, byte_spans)

    def token_bytes(self, ids: list[int]) -> list[bytes]:
        return table_bytes(self._bytes, ids)

    def special_token_id(self, token: str) -> int:
        if token in self._control:
            return self._control[token]
        return super().special_token_id(token)

    def special_token_text(self, token_id: int) -> str | None:
        return self.sp.id_to_piece(int(token_id)) if int(token_id) in self._special else None

    def save(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{_MODEL_FILE}.tmp"
        tmp.write_bytes(self.model_proto)
        os.replace(tmp, directory / _MODEL_FILE)
        path = directory / TOKENIZER_FILE
        write_json_atomic(path, {"kind": self.kind, "version": 1, "model_file": _MODEL_FILE})
        return path

    @classmethod
    def from_dict(cls, data: dict, source: str = "tokenizer descriptor") -> SentencePieceTokenizer:
        model = Path(source).parent / str(data.get("model_file", _MODEL_FILE))
        if not model.is_file():
            raise TokenizerError(f"{source}: sentencepiece model file {model.name!r} is missing")
        return cls.from_file(model)

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer(vocab_size={self.vocab_size})"
