"""Metrics sinks: JSONL (always), TensorBoard (when installed), and a live console progress display.

Only the global rank 0 writes. JSONL lines are flushed as they are written so a crashed run keeps every
step it finished.
"""

from __future__ import annotations

import json
import math
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


class MetricsLogger:
    """Writes ``metrics.jsonl`` (one object per record, with ``kind``: train/eval/...) and TensorBoard."""

    def __init__(
        self, output_dir: str | Path, enabled: bool = True, tensorboard: bool = True, resume: bool = False
    ):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._fh = None
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a" if resume else "w")  # noqa: SIM115 (closed in close())
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))
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
