"""The CLI run as a subprocess, the way a user runs it, for tests of what it prints and returns."""

from __future__ import annotations

import os
import subprocess
import sys

# A test process may run inside a multi-rank launcher; the CLI under test is a fresh single process.
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR")


def launcher_free_env() -> dict:
    """This process's environment without the multi-rank launcher's variables."""
    return {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}


def run_cli(*args: str, timeout: float = 240, cwd=None) -> subprocess.CompletedProcess:
    """``python -m opd_megatron.cli *args`` in :func:`launcher_free_env`."""
    return subprocess.run(
        [sys.executable, "-m", "opd_megatron.cli", *args], capture_output=True, text=True, timeout=timeout,
        env=launcher_free_env(), cwd=cwd,
    )  # fmt: skip


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The CLI's refusal: exit code 2, no traceback, and exactly one ``error:`` / ``config error:``
    line on stderr, which is returned."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith(("error:", "config error:"))]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]
