"""``opd-megatron launch``: submit a run config as a nemo-run Experiment (local torchrun or SLURM).

    opd-megatron launch run.yaml launch.executor=slurm launch.nodes=2 launch.gpus_per_node=8 --dryrun
    opd-megatron launch run.yaml launch.executor=local launch.gpus_per_node=2 --wait

``launch.*`` fields of the config say where the run goes; the flags say how this submission runs it.
"""

from __future__ import annotations

import argparse

from opd_megatron.config import load_config
from opd_megatron.launch.experiment import LaunchOptions, dryrun, launch
from opd_megatron.launch.slurm import wait_for_job
from opd_megatron.models.hf_dir import apply_hf_model_config

__all__ = ["add_launch_parser", "run_launch"]


def add_launch_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``launch`` subcommand; its handler is ``args.func`` (:func:`run_launch`)."""
    defaults = LaunchOptions()
    p = subparsers.add_parser(
        "launch",
        help="submit a run as a nemo-run experiment (local torchrun or SLURM)",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("config", nargs="?", help="YAML run config (defaults when omitted)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. launch.executor=slurm launch.nodes=2")
    # dest differs from "command", the name the main parser gives the chosen subcommand.
    p.add_argument(
        "--command",
        dest="run_command",
        default=defaults.command,
        help="opd-megatron subcommand each rank runs",
    )
    p.add_argument("--dryrun", action="store_true", help="print the sbatch and job scripts; submit nothing")
    p.add_argument("--wait", action="store_true", help="wait for the job(s) to finish")
    p.add_argument("--timeout", type=float, default=7 * 24 * 3600.0, help="seconds --wait waits for SLURM")
    p.add_argument("--python", default=defaults.python, help="python interpreter on the nodes")
    p.add_argument("--workdir", default=None, help="directory the job cd's into (see LaunchOptions.workdir)")
    p.add_argument("--packager", choices=("none", "git"), default=defaults.packager)
    p.add_argument(
        "--preempt-warning-s",
        type=int,
        default=defaults.preempt_warning_s,
        help="SIGUSR1 this long before the time limit (0: off)",
    )
    p.add_argument(
        "--retries", type=int, default=defaults.retries, help="requeues granted on a non-zero exit"
    )
    p.add_argument("--rdzv-port", type=int, default=defaults.rdzv_port)
    p.add_argument(
        "--teacher-command", default=defaults.teacher_command, help="served-teacher command template"
    )
    p.add_argument("--teacher-nodes", type=int, default=defaults.teacher_nodes)
    p.add_argument("--teacher-gpus-per-node", type=int, default=None)
    p.add_argument("--experiment", default=None, help="nemo-run experiment title (default: the run name)")
    p.set_defaults(func=run_launch)
    return p


def _options(args: argparse.Namespace) -> LaunchOptions:
    return LaunchOptions(
        command=args.run_command,
        python=args.python,
        workdir=args.workdir,
        packager=args.packager,
        preempt_warning_s=args.preempt_warning_s,
        retries=args.retries,
        rdzv_port=args.rdzv_port,
        teacher_command=args.teacher_command,
        teacher_nodes=args.teacher_nodes,
        teacher_gpus_per_node=args.teacher_gpus_per_node,
        experiment=args.experiment,
    )


def run_launch(args: argparse.Namespace) -> int:
    """Handler of ``opd-megatron launch``. ConfigError propagates to the CLI, which prints it."""
    path, overrides = args.config, list(args.overrides)
    if path is not None and "=" in path:  # an override in the config's position
        path, overrides = None, [path, *overrides]
    # As ``run`` and ``sft`` read it: ``model``/``tokenizer`` completed from an HF init checkpoint.
    cfg = load_config(path, overrides, prepare=apply_hf_model_config)
    opts = _options(args)
    if args.dryrun:
        result = dryrun(cfg, opts)
        for name, text in result.sbatch_scripts.items():
            print(f"# ===== sbatch script {name} =====\n{text}")
        for name, text in result.job_scripts.items():
            print(f"# ===== job script of task {name} (runs once per node) =====\n{text}")
        return 0
    result = launch(cfg, opts, wait=args.wait)
    print(f"experiment {result.experiment_id}: {result.experiment_dir}")
    if cfg.launch.executor != "slurm":
        if result.states:
            print(f"local job(s): {', '.join(result.states)}")
        return 0 if all(s == "SUCCEEDED" for s in result.states) else 1
    for job_id in result.job_ids:
        print(f"SLURM job {job_id}")
    if not args.wait:
        return 0
    status = 0
    for job_id in result.job_ids:
        info = wait_for_job(job_id, args.timeout)
        print(f"SLURM job {job_id}: {info.state} (exit {info.exit_code}, restarts {info.restarts})")
        status = status or (0 if info.state == "COMPLETED" else 1)
    return status
