"""Launching runs: nemo-run experiments for local torchrun and SLURM (``opd-megatron launch``)."""

from opd_megatron.launch.experiment import (
    LaunchOptions,
    LaunchResult,
    build_experiment,
    dryrun,
    launch,
    served_teachers,
)
from opd_megatron.launch.slurm import JobInfo, job_info, wait_for_job

__all__ = [
    "JobInfo",
    "LaunchOptions",
    "LaunchResult",
    "build_experiment",
    "dryrun",
    "job_info",
    "launch",
    "served_teachers",
    "wait_for_job",
]
