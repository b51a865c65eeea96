"""Locally trained tokenizers shared by the tokenization tests (each trains in well under a second)."""

from __future__ import annotations

import pytest

from opd_megatron.tokenization.train_local import train_hf_bpe, train_sentencepiece, train_tiktoken


@pytest.fixture(scope="session")
def sp_tok():
    return train_sentencepiece()


@pytest.fixture(scope="session")
def hf_tok():
    return train_hf_bpe()


@pytest.fixture(scope="session")
def tk_tok():
    return train_tiktoken()


@pytest.fixture(scope="session")
def all_toks(sp_tok, hf_tok, tk_tok):
    return {"sentencepiece": sp_tok, "hf": hf_tok, "tiktoken": tk_tok}


from tests.tokenization.hf_dirs import hf_dirs  # noqa: E402, F401  (fixture: HF tokenizer directories)
