"""Leftover job processes of the local cluster are found by their environment and killed."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _slurm_local():
    spec = importlib.util.spec_from_file_location("slurm_local_cleanup", REPO / "tools" / "slurm_local.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_kill_job_processes_kills_only_this_clusters_jobs(tmp_path):
    conf = str(tmp_path / "slurm.conf")
    env = dict(os.environ, SLURM_CONF=conf, SLURM_JOB_ID="7")
    job = subprocess.Popen(["sleep", "60"], env=env)
    other = subprocess.Popen(
        ["sleep", "60"], env=dict(os.environ, SLURM_CONF=conf + ".other", SLURM_JOB_ID="7")
    )
    try:
        killed = _slurm_local().kill_job_processes(conf)
        assert job.pid in killed and other.pid not in killed
        assert job.wait(timeout=10) == -9
        assert other.poll() is None
    finally:
        for p in (job, other):
            p.kill()
            p.wait()
