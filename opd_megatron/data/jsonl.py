"""JSONL prompt files: one JSON object per line (see :mod:`opd_megatron.data.rows` for the fields).

Blank lines are skipped. Every line is validated; all malformed lines are reported together in one
:class:`DataError`, each as ``"<file>:<line>: <problem>"`` (1-based line numbers): a bad row is never
dropped silently, and a file with one bad row fails before any training, not when the row is drawn.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from opd_megatron.data.rows import DataError, PromptRow, RowErrors

__all__ = ["DataError", "PromptRow", "iter_jsonl_records", "read_jsonl", "write_jsonl"]


def iter_jsonl_records(path: Path, errors: RowErrors):
    """``(location, record)`` per non-blank line; lines that are not UTF-8 JSON go to ``errors``."""
    with path.open("rb") as f:
        # Decode line by line (not the whole file) so an encoding error also gets its line number.
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                errors.add(where, f"not valid UTF-8 ({e.reason} at byte {e.start})")
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line.rstrip())  # without the newline, so columns point into the line
            except json.JSONDecodeError as e:
                errors.add(where, f"invalid JSON: {e.msg} at column {e.colno}")
                continue
            yield where, obj


def read_jsonl(
    path: str | os.PathLike,
    fields: Mapping[str, str] | None = None,
    extra_fields: str = "error",
    default_domain: str | None = None,
) -> list[PromptRow]:
    """Read and validate every row; raise :class:`DataError` listing every bad line.

    ``fields`` maps row fields to the file's own key names (``{"messages": "conversation"}``);
    ``extra_fields`` and ``default_domain`` are as in :func:`~opd_megatron.data.rows.row_from_record`."""
    from opd_megatron.data.sources import rows_from_records

    path = Path(path)
    errors = RowErrors(str(path))
    return rows_from_records(iter_jsonl_records(path, errors), errors, fields, extra_fields, default_domain)


def _record(row: PromptRow) -> dict:
    obj = {
        f.name: getattr(row, f.name)
        for f in dataclasses.fields(row)
        if f.name not in ("source", "messages") and getattr(row, f.name) is not None
    }
    if row.messages is not None:
        # A messages row is written as its conversation; the prompt text is derived from it on reading.
        del obj["prompt"]
        obj["messages"] = [m.as_dict() for m in row.messages]
    return obj


def write_jsonl(path: str | os.PathLike, rows: Iterable[PromptRow]) -> None:
    """Write rows, one JSON object per line (``None`` fields omitted), via a temporary file and a rename
    so readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(_record(row), ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
