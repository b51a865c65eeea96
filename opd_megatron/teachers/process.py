"""Start ``opd-megatron serve-teacher`` as a child process and wait until it listens (examples, tests,
benchmarks: anything that needs a real scoring service on 127.0.0.1 next to a training process)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

RENDEZVOUS_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def spawn_teacher_server(
    checkpoint: str | Path,
    *args: str,
    env: dict[str, str] | None = None,
    timeout_s: float = 180.0,
    cwd: str | Path | None = None,
) -> tuple[subprocess.Popen, str]:
    """Run ``serve-teacher CHECKPOINT --port 0 ARGS...`` and return the process and the URL it printed.

    The child gets this process's environment (plus ``env``) without torch.distributed's rendezvous
    variables: a parent that initialised a process group (say it trained in-process) would otherwise make
    the server join that group on the same port. Its output is drained on a thread for its whole life, so
    a chatty server never blocks on a full pipe; if it exits or stays silent past ``timeout_s``, the error
    carries its last lines."""
    cmd = [sys.executable, "-m", "opd_megatron.cli", "serve-teacher", str(checkpoint), "--port", "0", *args]
    child_env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARS}
    child_env.update({"PYTHONUNBUFFERED": "1", **(env or {})})
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env, cwd=cwd
    )
    lines: list[str] = []
    url: list[str] = []

    def drain():
        for line in proc.stdout:
            lines.append(line)
            if not url and line.startswith("serving teacher "):
                url.append(line.split(" on ", 1)[1].strip())

    threading.Thread(target=drain, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not url and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if not url:
        proc.kill()
        proc.wait()
        raise RuntimeError(
            f"teacher server did not start (exit code {proc.returncode}):\n" + "".join(lines[-30:])
        )
    return proc, url[0]


def stop_teacher_server(proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """SIGTERM (the server shuts down cleanly), then SIGKILL if it has not exited after ``timeout_s``."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
