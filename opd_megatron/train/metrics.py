"""Metrics sinks: JSONL (always), TensorBoard (when installed), and a live console progress display.

Only the global rank 0 writes. JSONL lines are flushed as they are written so a crashed run keeps every
step it finished.

Resume: a run killed after logging step ``S + 3`` but resuming from its checkpoint at step ``S`` replays
steps ``S + 1 ..``; their old records would then appear twice. ``MetricsLogger(..., resume_step=S)``
(or :func:`truncate_metrics`) keeps the records up to step ``S`` in ``metrics.jsonl`` and moves the rest,
and any torn last line, to ``metrics.discarded.jsonl``, so nothing is lost and nothing is duplicated.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep them visible instead of crashing the writer
    if hasattr(v, "item"):
        return _clean(v.item())
    return v


DISCARDED_NAME = "metrics.discarded.jsonl"


def truncate_metrics(path: str | Path, step: int) -> int:
    """Keep the records of ``path`` with ``step <= step``; move the others (and unparsable lines, such as
    a line torn by a kill) to ``metrics.discarded.jsonl`` next to it. Returns how many lines moved.

    The discarded lines are appended and flushed to disk before the log is replaced (atomically), so a
    crash in between leaves a line in both files, never in neither."""
    path = Path(path)
    if not path.is_file():
        return 0
    keep, drop = [], []
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            recorded = record.get("step") if isinstance(record, dict) else None
            ok = isinstance(recorded, int) and recorded <= step
        except ValueError:
            ok = False
        (keep if ok else drop).append(line)
    if not drop:
        return 0
    with open(path.with_name(DISCARDED_NAME), "a") as fh:
        fh.write("".join(f"{line}\n" for line in drop))
        fh.flush()
        os.fsync(fh.fileno())
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{line}\n" for line in keep))
    os.replace(tmp, path)
    return len(drop)


class MetricsLogger:
    """Writes ``metrics.jsonl`` (one object per record, with ``kind``: train/eval/...) and TensorBoard.

    ``resume=True`` appends to an existing log; ``resume_step=S`` (which implies it) first truncates the
    log to step ``S`` (:func:`truncate_metrics`) and drops TensorBoard events after ``S``.
    """

    def __init__(
        self,
        output_dir: str | Path,
        enabled: bool = True,
        tensorboard: bool = True,
        resume: bool = False,
        *,
        resume_step: int | None = None,
    ):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.discarded = 0
        """Records moved to ``metrics.discarded.jsonl`` when this logger opened (``resume_step``)."""
        self._fh = None
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            if resume_step < 0:
                raise ValueError(f"resume_step must be >= 0, got {resume_step}")
            resume = True
            self.discarded = truncate_metrics(self.path, resume_step)
        self._fh = open(self.path, "a" if resume else "w")  # noqa: SIM115 (closed in close())
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step: events at and after it, left by the killed run, are dropped on resume.
                purge = resume_step + 1 if resume_step is not None else None
                self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=purge)
            except ImportError:
                self._tb = None

    def log(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": round(time.time(), 3)}
        record.update({k: _clean(v) for k, v in values.items()})
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        if self._tb is not None:
            for k, v in values.items():
                v = _clean(v)
                if isinstance(v, int | float) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(path: str | Path, kind: str | None = None) -> list[dict]:
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            if kind is None or row.get("kind") == kind:
                rows.append(row)
    return rows


_NON_FINITE = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def logged_record(path: str | Path, kind: str, step: int) -> dict:
    """The values of the last ``kind`` record at ``step`` in the log ``path`` (non-finite numbers, which
    the log holds as strings, back as floats); ``{}`` when there is none. Lines that do not parse (one
    torn by a kill) are passed over."""
    path, found = Path(path), {}
    if not path.is_file():
        return {}
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("kind") == kind and row.get("step") == step:
            found = row
    values = {k: v for k, v in found.items() if k not in ("kind", "step", "time")}
    return {k: _NON_FINITE.get(v, v) if isinstance(v, str) else v for k, v in values.items()}


class Progress:
    """A live bar with ETA on a terminal; plain periodic lines otherwise (CI logs, files)."""

    def __init__(
        self, total: int, description: str, enabled: bool = True, start: int = 0, log_every: int = 10
    ):
        self.total, self.enabled, self.log_every = total, enabled, log_every
        self.start_step = start
        self._t0 = time.monotonic()
        self._rich = None
        self._last_line = ""
        if enabled and sys.stdout.isatty():
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self._rich = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
            )
            self._rich.start()
            self._task = self._rich.add_task(description, total=total, completed=start, info="")
        self.description = description

    def update(self, step: int, info: str = "") -> None:
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.update(self._task, completed=step, info=info)
            return
        if step % self.log_every == 0 or step == self.total:
            done = step - self.start_step
            elapsed = time.monotonic() - self._t0
            eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
            print(
                f"[{self.description}] {step}/{self.total} {info} elapsed {elapsed:.0f}s eta {eta:.0f}s",
                flush=True,
            )

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None
