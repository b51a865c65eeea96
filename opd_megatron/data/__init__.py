"""Prompt data: JSONL rows and the built-in synthetic domains with verifiers.

Kept free of torch imports (the config validates domain names through this package); the SFT batching
helpers live in :mod:`opd_megatron.data.batching`.
"""

from opd_megatron.data.domains import (
    DOMAINS,
    Domain,
    build_datasets,
    build_split,
    get_domain,
    split_of,
    verify,
)
from opd_megatron.data.jsonl import DataError, PromptRow, read_jsonl, write_jsonl

__all__ = [
    "DOMAINS",
    "DataError",
    "Domain",
    "PromptRow",
    "build_datasets",
    "build_split",
    "get_domain",
    "read_jsonl",
    "split_of",
    "verify",
    "write_jsonl",
]
