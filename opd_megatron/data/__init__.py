"""Prompt data: JSONL rows and the built-in synthetic domains with verifiers.

Kept free of torch imports; the SFT batching helpers live in :mod:`opd_megatron.data.batching`. Row
fields and validation: :mod:`~opd_megatron.data.rows`; readers: :mod:`~opd_megatron.data.sources`;
rendering a row's prompt to token ids: :mod:`~opd_megatron.data.render`.
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
from opd_megatron.data.jsonl import read_jsonl, write_jsonl
from opd_megatron.data.rows import DataError, Message, PromptRow
from opd_megatron.data.sources import read_rows

__all__ = [
    "DOMAINS",
    "DataError",
    "Domain",
    "Message",
    "PromptRow",
    "build_datasets",
    "build_split",
    "get_domain",
    "read_jsonl",
    "read_rows",
    "split_of",
    "verify",
    "write_jsonl",
]
