"""Build a nemo-run Experiment from a :class:`RunConfig`: local torchrun, one SLURM job, or a MOPD job.

What each executor runs is a short bash script that nemo-run ships with the experiment (an inline
``run.Script``). The script carries the fully resolved run config in a heredoc, writes it to a file on the
node it runs on, and ``exec``s torchrun on ``python -m opd_megatron.cli <command> <config>``. So nothing
but the experiment directory has to reach the cluster (nemo-run copies it through its tunnel), and a
requeued job re-runs exactly the same config.

Process layout:

* ``local``: one ``torchrun --standalone --nproc-per-node=<gpus_per_node>`` on this machine.
* ``slurm``: one task per node (``--ntasks-per-node=1``), each running one torchrun agent that starts
  ``gpus_per_node`` ranks. The agents meet through the c10d rendezvous on the first node of the step
  (``$OPD_RDZV_HOST:<rdzv_port>``, exported by the batch script) with the SLURM job id as rendezvous id, so
  a requeued job never joins a stale rendezvous. torchrun is started by our script rather than by
  nemo-run's ``Torchrun`` launcher because that launcher sizes every task of a heterogeneous job like the
  first one, and a MOPD job has tasks of different shapes.
* ``slurm`` with served teachers (MOPD): one heterogeneous SLURM job. Each remote teacher that has a
  checkpoint gets its own het group running the teacher server (``LaunchOptions.teacher_command``); the
  student is the last group. The student's override ``teachers.<i>.url=http://$OPD_TEACHER_<i>_HOST:<port>``
  hands it the node its teacher landed on; the port is the one in the teacher's configured url. Remote
  teachers without a checkpoint are external services and are left alone.

Preemption (see :mod:`opd_megatron.train.preemption`): SLURM jobs are submitted with ``--requeue`` (nemo-run
always does) and ``--signal=USR1@<preempt_warning_s>``; ``TORCHELASTIC_SIGNALS_TO_HANDLE`` makes torchrun
forward SIGUSR1 (and SIGTERM) to the ranks instead of dying on it. The trainer saves, runs
``scontrol requeue``, and the requeued job resumes from the latest checkpoint.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml

from opd_megatron.config import ConfigError, LaunchConfig, RunConfig, TeacherConfig, to_dict

__all__ = [
    "LaunchOptions",
    "LaunchResult",
    "TORCHELASTIC_SIGNALS",
    "build_experiment",
    "dryrun",
    "launch",
    "served_teachers",
    "slurm_job_id_from_handle",
]

TORCHELASTIC_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
"""torchrun's default set plus SIGUSR1, the time-limit warning of our SLURM jobs."""

_HEREDOC = "OPD_RUN_CONFIG_YAML"
_DEFAULT_TEACHER_PORT = 8000


@dataclass
class LaunchOptions:
    """Launch settings that are about this submission rather than the run (command-line flags)."""

    command: str = "sft"
    """The ``opd-megatron`` subcommand every rank runs (``sft``, ``opd``, ...)."""
    python: str = "python"
    """Interpreter on the nodes (in the container, or a virtual environment's ``bin/python``)."""
    workdir: str | None = None
    """Directory the job ``cd``s into, so relative paths in the config (``train.output_dir``) resolve as
    at submission. Default: the current directory for a local executor or a local SLURM tunnel without a
    container; otherwise nemo-run's code directory of the job."""
    packager: Literal["none", "git"] = "none"
    """``none``: run the code installed for ``python`` (a checkout on a shared filesystem, or the
    container's). ``git``: ship ``git archive HEAD`` of the current repository with the job and put it
    first on ``PYTHONPATH``."""
    preempt_warning_s: int = 120
    """Send SIGUSR1 this many seconds before the time limit so the trainer saves and requeues (0: off)."""
    retries: int = 0
    """Extra runs nemo-run's batch script grants a job that exits non-zero (``scontrol requeue``)."""
    rdzv_port: int = 29500
    """Port of the c10d rendezvous on the first node of a multi-node job."""
    teacher_command: str = (
        "{python} -m opd_megatron.cli serve-teacher {config} --teacher {name} --host 0.0.0.0 --port {port}"
    )
    """Command of a served teacher's het group; ``{python}``, ``{config}``, ``{name}``, ``{index}`` and
    ``{port}`` are filled in."""
    teacher_nodes: int = 1
    teacher_gpus_per_node: int | None = None
    """GPUs of each teacher server node; ``None`` uses ``launch.gpus_per_node``."""
    experiment: str | None = None
    """nemo-run experiment title; defaults to the run name."""

    def __post_init__(self):
        if not re.fullmatch(r"[A-Za-z0-9][\w-]*", self.command):
            raise ConfigError("command", f"not an opd-megatron subcommand: {self.command!r}")
        if self.packager not in ("none", "git"):
            raise ConfigError("packager", f"got {self.packager!r}; allowed: 'none', 'git'")
        for name in ("preempt_warning_s", "retries"):
            if getattr(self, name) < 0:
                raise ConfigError(name, "must be >= 0")
        if not 0 < self.rdzv_port < 65536:
            raise ConfigError("rdzv_port", f"not a TCP port: {self.rdzv_port}")
        if self.teacher_nodes < 1:
            raise ConfigError("teacher_nodes", "must be >= 1")


@dataclass
class LaunchResult:
    """What :func:`launch` / :func:`dryrun` produced."""

    experiment_id: str
    experiment_dir: str
    job_ids: list[str] = field(default_factory=list)
    """SLURM job ids (or nemo-run handles for local jobs); empty for a dry run."""
    sbatch_scripts: dict[str, str] = field(default_factory=dict)
    """Batch script of each SLURM job, by file name (dry run and real submission)."""
    job_scripts: dict[str, str] = field(default_factory=dict)
    """The per-node scripts the executors run, by task name."""
    states: list[str] = field(default_factory=list)
    """Final nemo-run state of each job of a local run that was waited for (``SUCCEEDED``, ``FAILED``)."""


# ----------------------------------------------------------------------------------------------------
# Teachers served by the job (MOPD)
# ----------------------------------------------------------------------------------------------------


def served_teachers(cfg: RunConfig) -> list[tuple[int, TeacherConfig]]:
    """Remote teachers this launch must start: the ones with a checkpoint to serve."""
    return [(i, t) for i, t in enumerate(cfg.teachers) if t.placement == "remote" and t.checkpoint]


def _teacher_port(t: TeacherConfig) -> int:
    port = urlsplit(t.url or "").port
    return port or _DEFAULT_TEACHER_PORT


def _teacher_url_override(index: int, t: TeacherConfig) -> str:
    parts = urlsplit(t.url or "http://host")
    scheme = parts.scheme or "http"
    path = parts.path.rstrip("/")
    return f"teachers.{index}.url={scheme}://${{OPD_TEACHER_{index}_HOST}}:{_teacher_port(t)}{path}"


# ----------------------------------------------------------------------------------------------------
# Job scripts
# ----------------------------------------------------------------------------------------------------


def _config_yaml(cfg: RunConfig) -> str:
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    # A line equal to the heredoc delimiter would end the config early; it cannot come from safe_dump
    # of our config tree unless a string value is exactly that, which we refuse rather than mangle.
    if any(line.strip() == _HEREDOC for line in text.splitlines()):
        raise ConfigError("", f"the config contains the reserved line {_HEREDOC!r}")
    return text


def _script_prelude(opts: LaunchOptions, cfg: RunConfig, workdir: str | None, role: str) -> list[str]:
    lines = [
        f"# opd-megatron launch: {role} of run {cfg.name!r}; one copy of this script runs on each node.",
        "set -euo pipefail",
    ]
    if workdir:
        lines.append(f"cd {shlex.quote(workdir)}")
    if opts.packager == "git":
        # nemo-run starts the step in the extracted archive (srun --chdir / --container-workdir).
        lines.append('export PYTHONPATH="${OPD_CODE_DIR:-$PWD}${PYTHONPATH:+:$PYTHONPATH}"')
    lines += [
        # One file per node and run: ranks of a node share it, a requeued run rewrites it.
        'cfg="$(mktemp "${TMPDIR:-/tmp}/opd-run-config.XXXXXX")"',
        f"cat > \"$cfg\" <<'{_HEREDOC}'",
        _config_yaml(cfg).rstrip("\n"),
        _HEREDOC,
    ]
    return lines


def _torchrun(opts: LaunchOptions, nproc: int, nodes: int, local: bool) -> str:
    base = f"{shlex.quote(opts.python)} -m torch.distributed.run"
    if local or nodes == 1:
        # One agent: a rendezvous on a free local port, so jobs sharing a node never collide.
        return f"{base} --standalone --nnodes=1 --nproc-per-node={nproc}"
    return (
        f"{base} --nnodes={nodes} --nproc-per-node={nproc} --rdzv-backend=c10d "
        f'--rdzv-endpoint="$OPD_RDZV_HOST:{opts.rdzv_port}" --rdzv-id="$SLURM_JOB_ID" '
        "--max-restarts=0"
    )


def student_script(
    cfg: RunConfig, opts: LaunchOptions, workdir: str | None, *, local: bool, extra_overrides: list[str]
) -> str:
    """The script each node of the student job runs: write the config, exec torchrun on the CLI."""
    launch = cfg.launch
    lines = _script_prelude(opts, cfg, workdir, "student" if extra_overrides else "training job")
    overrides = " ".join(f'"{o}"' for o in extra_overrides)
    cmd = (
        f"exec {_torchrun(opts, launch.gpus_per_node, launch.nodes, local)} "
        f'-m opd_megatron.cli {opts.command} "$cfg"'
    )
    lines.append(f"{cmd} {overrides}".rstrip())
    return "\n".join(lines) + "\n"


def teacher_script(
    cfg: RunConfig, opts: LaunchOptions, workdir: str | None, index: int, t: TeacherConfig
) -> str:
    lines = _script_prelude(opts, cfg, workdir, f"teacher server {t.name!r}")
    # SLURM sends the time-limit warning to every step of the job. The student saves and requeues the
    # whole job on it; a server killed by it first would fail the student's last requests instead.
    # An ignored signal stays ignored across exec.
    lines.append("trap '' USR1")
    cmd = opts.teacher_command.format(
        python=shlex.quote(opts.python),
        config='"$cfg"',
        name=shlex.quote(t.name),
        index=index,
        port=_teacher_port(t),
    )
    lines.append(f"exec {cmd}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------
# Executors
# ----------------------------------------------------------------------------------------------------


def _uses_gpus(cfg: RunConfig) -> bool:
    # gloo is the CPU backend: such a run asks SLURM for CPUs, not GPUs.
    return cfg.parallel.backend != "gloo"


def _tunnel(launch: LaunchConfig, job_dir: str) -> Any:
    import nemo_run as run

    if launch.tunnel == "ssh":
        return run.SSHTunnel(
            host=launch.host, user=launch.user or os.environ.get("USER", ""), job_dir=job_dir
        )
    return run.LocalTunnel(job_dir=job_dir)


def _packager(opts: LaunchOptions) -> Any:
    import nemo_run as run

    return run.GitArchivePackager() if opts.packager == "git" else run.Packager()


def _env(launch: LaunchConfig) -> dict[str, str]:
    env = {"TORCHELASTIC_SIGNALS_TO_HANDLE": TORCHELASTIC_SIGNALS}
    env.update(launch.env)
    for key, value in env.items():
        # nemo-run writes `export KEY=value` unquoted into the batch script.
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) or re.search(r"\s", value):
            raise ConfigError(
                f"launch.env.{key}", "names must be shell identifiers and values without spaces"
            )
    return env


def _slurm_executor(
    cfg: RunConfig,
    opts: LaunchOptions,
    *,
    nodes: int,
    procs_per_node: int,
    gpus: bool,
    heterogeneous: bool = False,
    setup_lines: list[str],
) -> Any:
    import nemo_run as run

    launch = cfg.launch
    if launch.tunnel == "local":
        # nemo-run keeps a local experiment in <base_dir>/experiments/<title>/<id>; a local tunnel must
        # point at the same place so the batch script finds the job scripts there.
        job_dir = str(Path(launch.job_dir).expanduser().absolute() / "experiments")
    else:
        job_dir = launch.job_dir  # a path on the cluster; nemo-run rsyncs the experiment there
    return run.SlurmExecutor(
        account=launch.account,  # type: ignore[arg-type]  # None: no --account line
        partition=launch.partition,
        job_name_prefix=f"{launch.account}-" if launch.account else "opd-",
        time=launch.time,
        nodes=nodes,
        ntasks_per_node=1,
        gpus_per_node=procs_per_node if gpus else None,
        cpus_per_task=None if gpus else procs_per_node,
        container_image=launch.container_image,
        container_mounts=list(launch.container_mounts),
        env_vars=_env(launch),
        signal=f"USR1@{opts.preempt_warning_s}" if opts.preempt_warning_s else None,
        heterogeneous=heterogeneous,
        setup_lines="\n".join(setup_lines) if setup_lines else None,
        tunnel=_tunnel(launch, job_dir),
        packager=_packager(opts),
        retries=opts.retries,
        # The start-time poller is a background thread per job; our caller polls when it wants to wait.
        poll_estimated_start_time=False,
    )


def _local_executor(cfg: RunConfig) -> Any:
    import nemo_run as run

    if cfg.launch.nodes != 1:
        raise ConfigError("launch.nodes", f"the local executor runs on one node, got {cfg.launch.nodes}")
    return run.LocalExecutor(ntasks_per_node=1, env_vars=_env(cfg.launch))


def _workdir(cfg: RunConfig, opts: LaunchOptions) -> str | None:
    if opts.workdir:
        return opts.workdir
    launch = cfg.launch
    if launch.executor == "local" or (launch.tunnel == "local" and not launch.container_image):
        return os.getcwd()
    return None  # a container or a remote cluster: nemo-run's code directory


# ----------------------------------------------------------------------------------------------------
# Experiment
# ----------------------------------------------------------------------------------------------------


def _experiment_title(cfg: RunConfig, opts: LaunchOptions) -> str:
    return re.sub(r"[^\w.-]+", "-", opts.experiment or cfg.name)


def build_experiment(cfg: RunConfig, opts: LaunchOptions | None = None) -> tuple[Any, dict[str, str]]:
    """An open nemo-run Experiment holding the run's task(s), and the job scripts by task name.

    The experiment has been entered (``__enter__``); the caller runs or dry-runs it and must exit it.
    """
    import nemo_run as run

    opts = opts or LaunchOptions()
    launch = cfg.launch
    workdir = _workdir(cfg, opts)
    title = _experiment_title(cfg, opts)
    base_dir = str(Path(launch.job_dir).expanduser().absolute())
    # Status at exit needs sacct (SLURM accounting), which many clusters lack; our CLI reports the job itself.
    exp = run.Experiment(
        title, base_dir=base_dir, log_level="WARN", enable_goodbye_message=False, skip_status_at_exit=True
    )
    exp.__enter__()
    scripts: dict[str, str] = {}
    try:
        teachers = served_teachers(cfg)
        if launch.executor == "local":
            if teachers:
                raise ConfigError(
                    "teachers", "the local executor does not start teacher servers; start them yourself"
                )
            scripts[title] = student_script(cfg, opts, workdir, local=True, extra_overrides=[])
            exp.add(run.Script(inline=scripts[title]), executor=_local_executor(cfg), name=title)
            return exp, scripts

        gpus = _uses_gpus(cfg)
        if not teachers:
            setup = [] if launch.nodes == 1 else ['export OPD_RDZV_HOST="$head_node"']
            scripts[title] = student_script(cfg, opts, workdir, local=False, extra_overrides=[])
            executor = _slurm_executor(
                cfg,
                opts,
                nodes=launch.nodes,
                procs_per_node=launch.gpus_per_node,
                gpus=gpus,
                setup_lines=setup,
            )
            exp.add(run.Script(inline=scripts[title]), executor=executor, name=title)
            return exp, scripts

        # MOPD: het groups 0..k-1 serve teachers, group k is the student.
        student_group = len(teachers)
        setup = [f'export OPD_TEACHER_{i}_HOST="$het_group_host_{g}"' for g, (i, _) in enumerate(teachers)]
        setup.append(f'export OPD_RDZV_HOST="$het_group_host_{student_group}"')
        tasks, executors = [], []
        teacher_gpus = opts.teacher_gpus_per_node or launch.gpus_per_node
        for i, t in teachers:
            name = f"teacher-{re.sub(r'[^A-Za-z0-9-]+', '-', t.name)}"
            scripts[name] = teacher_script(cfg, opts, workdir, i, t)
            tasks.append(run.Script(inline=scripts[name]))
            executors.append(
                _slurm_executor(
                    cfg,
                    opts,
                    nodes=opts.teacher_nodes,
                    procs_per_node=teacher_gpus,
                    gpus=gpus,
                    heterogeneous=True,
                    setup_lines=setup,
                )
            )
        overrides = [_teacher_url_override(i, t) for i, t in teachers]
        scripts["student"] = student_script(cfg, opts, workdir, local=False, extra_overrides=overrides)
        tasks.append(run.Script(inline=scripts["student"]))
        executors.append(
            _slurm_executor(
                cfg,
                opts,
                nodes=launch.nodes,
                procs_per_node=launch.gpus_per_node,
                gpus=gpus,
                heterogeneous=True,
                setup_lines=setup,
            )
        )
        exp.add(tasks, executor=executors, name=title)
        return exp, scripts
    except BaseException:
        exp.__exit__(None, None, None)
        raise


def _collect_sbatch(exp_dir: str) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(Path(exp_dir).glob("*_sbatch.sh"))}


def dryrun(cfg: RunConfig, opts: LaunchOptions | None = None) -> LaunchResult:
    """Render everything a launch would submit, without submitting; leaves no experiment directory."""
    exp, scripts = build_experiment(cfg, opts)
    try:
        exp.dryrun(log=False, delete_exp_dir=False)
        result = LaunchResult(exp._id, exp._exp_dir, [], _collect_sbatch(exp._exp_dir), scripts)
        shutil.rmtree(exp._exp_dir, ignore_errors=True)
        return result
    finally:
        exp.__exit__(None, None, None)


def slurm_job_id_from_handle(handle: str) -> str:
    """The SLURM job id at the end of a nemo-run handle (``<scheduler>://<session>/<job id>``)."""
    return handle.rstrip("/").rsplit("/", 1)[-1]


def launch(cfg: RunConfig, opts: LaunchOptions | None = None, *, wait: bool = False) -> LaunchResult:
    """Submit the run. SLURM jobs are detached (this process may exit; see
    :func:`opd_megatron.launch.slurm.wait_for_job`); a local run is waited for when ``wait`` is true."""
    exp, scripts = build_experiment(cfg, opts)
    slurm = cfg.launch.executor == "slurm"
    try:
        exp.run(detach=slurm or not wait, tail_logs=wait and not slurm)
    finally:
        exp.__exit__(None, None, None)  # a waited-for local run finishes in here
    if slurm:
        ids = [slurm_job_id_from_handle(j.handle) for j in exp.jobs]
        states: list[str] = []
    else:
        ids = [j.handle for j in exp.jobs]
        states = [getattr(j.state, "name", str(j.state)) for j in exp.jobs] if wait else []
    return LaunchResult(exp._id, exp._exp_dir, ids, _collect_sbatch(exp._exp_dir), scripts, states)
