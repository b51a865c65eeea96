"""Ask SLURM about a job: state, restarts and exit code, and wait for it to end.

nemo-run's own status calls need ``sacct`` (SLURM accounting); clusters without a database, and the
one-node test cluster, only have the controller's job records. This reads those with ``scontrol``
(they live ``MinJobAge`` seconds after the job ends, 300 s by default) and falls back to ``sacct``.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["TERMINAL_STATES", "JobInfo", "job_info", "wait_for_job"]

TERMINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
)
"""States a job does not leave. PREEMPTED is not among them: a requeueable job comes back from it."""


@dataclass(frozen=True)
class JobInfo:
    job_id: str
    state: str
    """SLURM job state (``PENDING``, ``RUNNING``, ``REQUEUED``, ``COMPLETED``, ...); ``UNKNOWN`` when
    neither scontrol nor sacct knows the job."""
    restarts: int
    """How many times the job was requeued (``SLURM_RESTART_COUNT`` of its current run)."""
    exit_code: str
    """``<code>:<signal>`` of the batch script, as SLURM reports it."""

    @property
    def done(self) -> bool:
        return self.state in TERMINAL_STATES


def _run(cmd: list[str], env: Mapping[str, str] | None) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, env=env)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def job_info(job_id: str, env: Mapping[str, str] | None = None) -> JobInfo:
    """Current state of ``job_id`` (the first component of a heterogeneous job)."""
    out = _run(["scontrol", "show", "job", "--oneliner", job_id], env)
    if out:
        first = out.splitlines()[0]
        fields = dict(tok.split("=", 1) for tok in first.split() if "=" in tok)
        return JobInfo(
            job_id,
            fields.get("JobState", "UNKNOWN"),
            int(fields.get("Restarts", "0") or 0),
            fields.get("ExitCode", ""),
        )
    out = _run(["sacct", "--noheader", "--parsable2", "--format=JobID,State,ExitCode", "-j", job_id], env)
    for line in (out or "").splitlines():
        jid, state, code = (line.split("|") + ["", "", ""])[:3]
        if jid == job_id:
            # sacct writes "CANCELLED by 0"; keep the state word only.
            return JobInfo(job_id, state.split()[0] if state else "UNKNOWN", 0, code)
    return JobInfo(job_id, "UNKNOWN", 0, "")


def wait_for_job(
    job_id: str, timeout_s: float, env: Mapping[str, str] | None = None, poll_s: float = 1.0
) -> JobInfo:
    """Poll until the job reaches a terminal state; raise TimeoutError with its last state otherwise."""
    deadline = time.monotonic() + timeout_s
    info = job_info(job_id, env)
    while not info.done:
        if time.monotonic() > deadline:
            raise TimeoutError(f"SLURM job {job_id} still {info.state} after {timeout_s:.0f}s")
        time.sleep(poll_s)
        info = job_info(job_id, env)
    return info
