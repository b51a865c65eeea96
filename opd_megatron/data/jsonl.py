"""Prompt rows and their JSONL files.

One row per line: ``{"prompt": ..., "domain": ..., "reference": ..., "privileged": ...}``. ``prompt``
and ``domain`` are required non-empty strings; ``reference`` (the correct completion, used by SFT and
verifiers) and ``privileged`` (information only a self-distillation teacher sees) are optional strings.
Blank lines are skipped. Any other malformed line raises :class:`DataError` naming the file, the 1-based
line number and the problem: a bad row is never dropped silently.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DataError", "PromptRow", "read_jsonl", "write_jsonl"]


class DataError(ValueError):
    """A malformed data row or file, or a dataset that cannot be built as asked."""


@dataclass(frozen=True)
class PromptRow:
    """One prompt and what is known about its answer."""

    prompt: str
    domain: str
    """Routes the prompt to its teacher (MOPD) and its verifier (built-in domains)."""
    reference: str | None = None
    """The correct completion text (without EOS)."""
    privileged: str | None = None
    """A hint only a self-distillation teacher is conditioned on (a worked step, the answer)."""


_FIELDS = {f.name: f for f in dataclasses.fields(PromptRow)}
_REQUIRED = ("prompt", "domain")


def _row_from_obj(obj: object) -> PromptRow:
    """Validate one decoded JSON value; raise ``DataError`` with the problem (no location)."""
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {type(obj).__name__}")
    for key in obj:
        if key not in _FIELDS:
            close = difflib.get_close_matches(key, list(_FIELDS), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else f"known fields: {', '.join(_FIELDS)}"
            raise DataError(f"unknown field {key!r}; {hint}")
    for key in _REQUIRED:
        if key not in obj:
            raise DataError(f"missing required field {key!r}")
    for key, value in obj.items():
        optional = key not in _REQUIRED
        if not (isinstance(value, str) or (optional and value is None)):
            allowed = "a string or null" if optional else "a string"
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise DataError(f"field {key!r} must be {allowed}, got {type(value).__name__} {shown}")
    for key in _REQUIRED:
        if not obj[key].strip():
            raise DataError(f"field {key!r} is empty")
    return PromptRow(**obj)


def read_jsonl(path: str | os.PathLike) -> list[PromptRow]:
    """Read prompt rows; raise :class:`DataError` ``"<file>:<line>: <problem>"`` on the first bad row."""
    path = Path(path)
    rows = []
    with path.open("rb") as f:
        # Decode line by line (not the whole file) so an encoding error also gets its line number.
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line.rstrip())  # without the newline, so columns point into the line
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON: {e.msg} at column {e.colno}") from None
            try:
                rows.append(_row_from_obj(obj))
            except DataError as e:
                raise DataError(f"{where}: {e}") from None
    return rows


def write_jsonl(path: str | os.PathLike, rows: Iterable[PromptRow]) -> None:
    """Write rows, one JSON object per line (``None`` fields omitted), via a temporary file and a rename
    so readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                obj = {k: v for k, v in dataclasses.asdict(row).items() if v is not None}
                f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
