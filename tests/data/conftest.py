"""Fixtures shared by the data tests."""

from tests.tokenization.hf_dirs import hf_dirs  # noqa: F401  (fixture: HF tokenizer directories)
