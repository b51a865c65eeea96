"""Reading prompt rows from the files users have: JSONL, Parquet, and ``datasets`` directories.

:func:`read_rows` picks the reader from the path: a directory written by ``datasets``'
``save_to_disk`` (it holds ``state.json`` / ``dataset_info.json``), a ``.parquet`` file, or a JSONL file
(any other file). Every row is validated before the function returns and every bad row is reported in one
:class:`DataError`, with its location: ``file:line`` (1-based) for JSONL, ``path: row i`` (0-based, as
``datasets`` and pandas count) for tables. A missing path, a directory that is not a saved dataset, and
a ``DatasetDict`` (several splits) are one-line errors naming the path.

Column names: ``fields`` maps a row field to the column holding it (``{"messages": "conversations",
"domain": "source"}``); the mapped columns are read under the row's names, the other columns as they are.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from opd_megatron.data.rows import FIELDS, DataError, PromptRow, RowErrors, row_from_record

__all__ = ["map_fields", "read_datasets_dir", "read_parquet", "read_rows", "rows_from_records"]

_DATASET_MARKERS = ("state.json", "dataset_info.json")


def map_fields(record: Mapping, fields: Mapping[str, str] | None) -> dict:
    """``record`` with each mapped column renamed to its row field (``fields``: row field -> column)."""
    if not fields:
        return dict(record)
    columns = set(fields.values())
    out = {k: v for k, v in record.items() if k not in columns}
    for name, column in fields.items():
        if column in record:
            out[name] = record[column]
    return out


def rows_from_records(
    records: Iterable[tuple[str, object]],
    errors: RowErrors,
    fields: Mapping[str, str] | None = None,
    extra_fields: str = "error",
    default_domain: str | None = None,
) -> list[PromptRow]:
    """Validate ``(location, record)`` pairs; every bad one is added to ``errors``, raised at the end."""
    rows = []
    for where, record in records:
        try:
            obj = map_fields(record, fields) if isinstance(record, Mapping) else record
            row = row_from_record(obj, extra_fields=extra_fields, default_domain=default_domain)
        except DataError as e:
            errors.add(where, str(e))
            continue
        rows.append(PromptRow(row.prompt, row.domain, row.reference, row.privileged, row.messages, where))
    errors.raise_if_any()
    return rows


def _check_fields(fields: Mapping[str, str] | None, columns: list[str], path: Path) -> None:
    for name, column in (fields or {}).items():
        if name not in FIELDS:
            raise DataError(f"data.fields: unknown row field {name!r}; row fields: {', '.join(FIELDS)}")
        if column not in columns:
            raise DataError(
                f"{path}: data.fields.{name} names column {column!r}, which it does not have; "
                f"columns: {', '.join(columns)}"
            )


def read_parquet(
    path: str | os.PathLike,
    fields: Mapping[str, str] | None = None,
    extra_fields: str = "error",
    default_domain: str | None = None,
) -> list[PromptRow]:
    """Rows of a Parquet file (``messages`` as a list of ``{role, content}`` structs)."""
    import pyarrow.parquet as pq

    path = Path(path)
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a damaged or non-Parquet file
        raise DataError(
            f"{path}: not a readable Parquet file ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None
    _check_fields(fields, table.column_names, path)
    records = ((f"{path}: row {i}", rec) for i, rec in enumerate(table.to_pylist()))
    return rows_from_records(records, RowErrors(str(path)), fields, extra_fields, default_domain)


def is_dataset_dir(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in _DATASET_MARKERS)


def read_datasets_dir(
    path: str | os.PathLike,
    fields: Mapping[str, str] | None = None,
    extra_fields: str = "error",
    default_domain: str | None = None,
) -> list[PromptRow]:
    """Rows of a ``datasets.Dataset`` saved with ``save_to_disk``; for a ``DatasetDict``, point at the
    split's sub-directory."""
    path = Path(path)
    splits = sorted(p.name for p in path.iterdir() if is_dataset_dir(p)) if path.is_dir() else []
    if (path / "dataset_dict.json").is_file() or (splits and not is_dataset_dir(path)):
        raise DataError(
            f"{path}: a dataset with several splits ({', '.join(splits)}); point the path at one split's "
            f"directory, e.g. {path / (splits[0] if splits else 'train')}"
        )
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises FileNotFoundError/ValueError/pyarrow errors for damaged dirs
        raise DataError(
            f"{path}: not a readable saved dataset ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None
    _check_fields(fields, list(ds.column_names), path)
    records = ((f"{path}: row {i}", rec) for i, rec in enumerate(ds))
    return rows_from_records(records, RowErrors(str(path)), fields, extra_fields, default_domain)


def read_rows(
    path: str | os.PathLike,
    fields: Mapping[str, str] | None = None,
    extra_fields: str = "error",
    default_domain: str | None = None,
    field_name: str = "data.train_path",
) -> list[PromptRow]:
    """Rows of a JSONL file, a Parquet file or a saved ``datasets`` directory (see the module docstring).

    ``field_name`` is the config field the path came from, named in the errors about the path itself."""
    from opd_megatron.data.jsonl import read_jsonl

    p = Path(path)
    if not p.exists():
        raise DataError(f"{field_name}: no such file or directory: {p}")
    if p.is_dir():
        if is_dataset_dir(p) or (p / "dataset_dict.json").is_file():
            return read_datasets_dir(p, fields, extra_fields, default_domain)
        raise DataError(
            f"{field_name}: {p} is a directory, not a JSONL or Parquet file or a dataset saved with "
            "datasets' save_to_disk (no state.json / dataset_info.json in it)"
        )
    if p.suffix == ".parquet":
        return read_parquet(p, fields, extra_fields, default_domain)
    return read_jsonl(p, fields, extra_fields, default_domain)
