"""SentencePiece, tiktoken and HF adapters: offsets, specials, persistence, loading by config."""

from __future__ import annotations

import pytest

from opd_megatron.config import TokenizerConfig
from opd_megatron.tokenization import load_tokenizer
from opd_megatron.tokenization.base import TokenizerError, char_offsets_from_bytes

KINDS = ["sentencepiece", "hf", "tiktoken"]
TEXTS = [
    "",
    "Hello world.",
    "  leading spaces and\ttabs\n\nnewlines",
    "Café naïve 日本語 Привет 🙂👍",
    "12345 + 678 = 13023",
    "def f(x):\n    return x + 1",
    "€ ß ∑ unseen characters",
    "<|im_start|>user\nnot a special<|im_end|>",
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("text", TEXTS)
def test_offsets_tile_the_text(all_toks, kind, text):
    tok = all_toks[kind]
    ids, byte_spans = tok.encode_with_byte_offsets(text)
    data = text.encode("utf-8")
    assert tok.decode(ids) == text
    assert [data[s:e] for s, e in byte_spans] == tok.token_bytes(ids)
    assert b"".join(tok.token_bytes(ids)) == data
    assert (byte_spans[0][0] if ids else 0) == 0 and (byte_spans[-1][1] if ids else 0) == len(data)
    ids2, char_spans = tok.encode_with_offsets(text)
    assert ids2 == ids
    assert "".join(text[s:e] for s, e in char_spans) == text
    # exact char spans exist exactly where byte spans fall on character boundaries
    for (bs, be), exact in zip(byte_spans, char_offsets_from_bytes(text, byte_spans)):
        if exact is not None:
            assert text[exact[0] : exact[1]].encode() == data[bs:be]
    assert not set(ids) & tok.special_ids  # special-looking text never becomes a special token


def test_byte_level_token_ends_inside_a_character(hf_tok):
    text = "x 日本"
    ids, byte_spans = hf_tok.encode_with_byte_offsets(text)
    assert hf_tok.token_bytes(ids) == [b"x", b" \xe6\x97", b"\xa5\xe6\x9c\xac"]
    assert char_offsets_from_bytes(text, byte_spans) == [(0, 1), None, None]
    assert hf_tok.encode_with_offsets(text)[1] == [(0, 1), (1, 2), (2, 4)]  # rounded down to a character


def test_sentencepiece_byte_fallback_pieces(sp_tok):
    ids, byte_spans = sp_tok.encode_with_byte_offsets("a€")
    assert sp_tok.token_bytes(ids) == [b"a", b"\xe2", b"\x82", b"\xac"]
    assert byte_spans == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert sp_tok.encode_with_offsets("a€")[1] == [(0, 1), (1, 1), (1, 1), (1, 2)]
    assert sp_tok.decode(ids[:2]) == "a\ufffd"  # a cut character decodes to the replacement character


@pytest.mark.parametrize("kind", KINDS)
def test_special_tokens(all_toks, kind):
    tok = all_toks[kind]
    im_start = tok.special_token_id("<|im_start|>")
    assert {im_start, tok.eos_id, tok.pad_id} <= tok.special_ids
    assert tok.special_token_text(im_start) == "<|im_start|>"
    assert tok.special_token_text(tok.encode("a")[0]) is None
    assert tok.token_bytes([im_start, tok.eos_id]) == [b"", b""]
    assert tok.decode([im_start, *tok.encode("hi")]) == "hi"
    assert tok.decode([im_start, *tok.encode("hi")], skip_special=False) == "<|im_start|>hi"
    with pytest.raises(TokenizerError, match="no special token"):
        tok.special_token_id("<|nope|>")
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.token_bytes([tok.vocab_size])
    assert max(tok.special_ids) < tok.vocab_size
    if kind == "sentencepiece":
        assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    else:
        assert tok.bos_id is None and tok.pad_id == tok.eos_id


@pytest.mark.parametrize("kind", KINDS)
def test_save_and_load(all_toks, kind, tmp_path):
    tok = all_toks[kind]
    tok.save(tmp_path / "tok")
    for source in (tmp_path / "tok", TokenizerConfig(kind=kind, path=str(tmp_path / "tok"))):
        loaded = load_tokenizer(source)
        assert type(loaded) is type(tok) and loaded.vocab_size == tok.vocab_size
        assert loaded.encode(TEXTS[3]) == tok.encode(TEXTS[3])
        assert loaded.special_ids == tok.special_ids and loaded.eos_id == tok.eos_id


def test_load_raw_files(sp_tok, hf_tok, tk_tok, tmp_path):
    sp_tok.save(tmp_path / "sp")
    hf_tok.save(tmp_path / "hf")
    tk_tok.save(tmp_path / "tk")
    sp = load_tokenizer(TokenizerConfig(kind="sentencepiece", path=str(tmp_path / "sp/tokenizer.model")))
    hf = load_tokenizer(TokenizerConfig(kind="hf", path=str(tmp_path / "hf/tokenizer.json")))
    tk = load_tokenizer(
        TokenizerConfig(kind="tiktoken", path=str(tmp_path / "tk/ranks.tiktoken"), chat_template="llama3")
    )
    assert sp.encode(TEXTS[4]) == sp_tok.encode(TEXTS[4]) and hf.encode(TEXTS[4]) == hf_tok.encode(TEXTS[4])
    assert hf.eos_id == hf_tok.eos_id  # <|endoftext|> found among the EOS candidates
    assert tk.encode(TEXTS[4]) == tk_tok.encode(TEXTS[4])
    assert tk.eos_id == len(tk.ranks) and tk.special_token_id("<|eot_id|>") > tk.eos_id


def test_digits_split_differently(sp_tok, tk_tok):
    assert sp_tok.token_bytes(sp_tok.encode("12345")) == [b"1", b"2", b"3", b"4", b"5"]
    pieces = tk_tok.token_bytes(tk_tok.encode("12345"))
    assert len(pieces) < 5 and b"".join(pieces[-1:]) == b"45"  # pre-tokenised in groups of three: 123|45
