"""The character tokenizer: coverage of the built-in domains, offsets, errors, persistence."""

import json
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from opd_megatron.config import ConfigError, TokenizerConfig
from opd_megatron.data.domains import DOMAINS
from opd_megatron.tokenization import TOKENIZER_FILE, CharTokenizer, Tokenizer, TokenizerError, load_tokenizer
from opd_megatron.tokenization.char import DEFAULT_CHARS, SPECIAL_TOKENS


@pytest.fixture(scope="module")
def tok() -> CharTokenizer:
    return CharTokenizer()


def test_fixed_ids(tok):
    # Checkpoints depend on these ids never moving.
    assert isinstance(tok, Tokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.vocab_size == len(SPECIAL_TOKENS) + len(DEFAULT_CHARS) == 64
    assert tok.encode("\n 0a") == [4, 5, 6, 16]


@pytest.mark.parametrize("difficulty", [1, 3, 12])
def test_round_trip_every_domain_text(tok, difficulty):
    rng = random.Random(difficulty)
    for domain in DOMAINS.values():
        for _ in range(50):
            row = domain.generate(rng, difficulty)
            for text in (row.prompt, row.reference, row.privileged, row.prompt + row.reference + "\n"):
                ids = tok.encode(text)
                assert len(ids) == len(text)
                assert tok.decode(ids) == text


@given(st.text(alphabet=DEFAULT_CHARS, max_size=64))
def test_round_trip_property(text):
    tok = CharTokenizer()
    ids = tok.encode(text)
    assert all(len(SPECIAL_TOKENS) <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_offsets(tok):
    text = "add 12+3=\n"
    ids, offsets = tok.encode_with_offsets(text)
    assert ids == tok.encode(text)
    assert offsets == [(i, i + 1) for i in range(len(text))]
    assert "".join(text[s:e] for s, e in offsets) == text
    assert tok.encode_with_offsets("") == ([], [])


def test_decode_special_tokens(tok):
    ids = [tok.bos_id] + tok.encode("ab") + [tok.eos_id, tok.pad_id]
    assert tok.decode(ids) == "ab"
    assert tok.decode(ids, skip_special=False) == "<bos>ab<eos><pad>"
    with pytest.raises(TokenizerError, match="token id 64 at position 1 is outside the vocabulary"):
        tok.decode([4, 64])


def test_oov_error_names_character_and_position(tok):
    with pytest.raises(TokenizerError) as e:
        tok.encode("sort 12é4=")
    msg = str(e.value)
    assert "'é'" in msg and "U+00E9" in msg and "position 7" in msg and "errors='replace'" in msg


def test_oov_replace(tok):
    ids = tok.encode("aÉb", errors="replace")
    assert ids == [tok.encode("a")[0], tok.unk_id, tok.encode("b")[0]]
    assert tok.decode(ids) == "a\ufffdb"
    with pytest.raises(ValueError, match="errors must be"):
        tok.encode("a", errors="ignore")


def test_save_load(tmp_path, tok):
    path = tok.save(tmp_path / "ckpt")
    assert path.name == TOKENIZER_FILE
    for source in (tmp_path / "ckpt", path, TokenizerConfig(kind="char", path=str(tmp_path / "ckpt"))):
        loaded = load_tokenizer(source)
        assert loaded == tok and loaded.encode("add 1+2=") == tok.encode("add 1+2=")
    assert load_tokenizer(TokenizerConfig()) == tok


def test_saved_vocab_is_used(tmp_path):
    # A checkpoint keeps decoding with the vocabulary it was saved with, not the current default.
    CharTokenizer("xyz").save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.vocab_size == 7 and loaded.encode("zyx") == [6, 5, 4]


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=TOKENIZER_FILE):
        load_tokenizer(tmp_path)
    (tmp_path / TOKENIZER_FILE).write_text("{not json")
    with pytest.raises(TokenizerError, match="not valid JSON"):
        load_tokenizer(tmp_path)
    (tmp_path / TOKENIZER_FILE).write_text(json.dumps({"kind": "bpe"}))
    with pytest.raises(
        TokenizerError,
        match="kind 'bpe' is not supported; supported: 'char', 'hf', 'sentencepiece', 'tiktoken'",
    ):
        load_tokenizer(tmp_path)
    data = CharTokenizer().to_dict() | {"chars": "abca"}
    (tmp_path / TOKENIZER_FILE).write_text(json.dumps(data))
    with pytest.raises(TokenizerError, match="duplicates: 'a'"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("kind", ["sentencepiece", "tiktoken", "hf"])
def test_missing_tokenizer_file(kind, tmp_path):
    with pytest.raises(ConfigError, match="tokenizer.path: no tokenizer file at"):
        load_tokenizer(TokenizerConfig(kind=kind, path=str(tmp_path / "tok.model")))
