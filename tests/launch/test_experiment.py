"""nemo-run experiments built from a run config: dry-run scripts for local, SLURM and MOPD jobs."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from opd_megatron.config import ConfigError, load_config, to_dict
from opd_megatron.launch import LaunchOptions, dryrun

ACCEL = ["launch.executor=slurm", "launch.account=proj_llm", "launch.partition=batch", "launch.time=04:00:00"]
IMAGE = "nvcr.io/nvidia/pytorch:25.01-py3"


def _heredoc_config(script: str) -> dict:
    body = script.split("<<'OPD_RUN_CONFIG_YAML'\n", 1)[1].split("\nOPD_RUN_CONFIG_YAML\n", 1)[0]
    return yaml.safe_load(body)


def _sbatch_flags(script: str) -> dict[str, str]:
    flags = {}
    for line in script.splitlines():
        m = re.match(r"#SBATCH --([\w-]+)(?:=(.*))?$", line)
        if m:
            flags[m.group(1)] = m.group(2) or ""
    return flags


def test_two_nodes_eight_gpus_dryrun(tmp_path):
    cfg = load_config(
        None,
        [
            *ACCEL,
            "launch.nodes=2",
            "launch.gpus_per_node=8",
            f"launch.container_image={IMAGE}",
            "launch.container_mounts=[/lustre/data:/data, /lustre/ckpt:/ckpt]",
            "launch.env={NCCL_IB_HCA: mlx5, NCCL_SOCKET_IFNAME: ib0}",
            f"launch.job_dir={tmp_path}",
            "parallel.tensor_model_parallel_size=4",
            "train.output_dir=/ckpt/run1",
        ],
    )
    result = dryrun(cfg, LaunchOptions(rdzv_port=29511))
    assert result.job_ids == []
    ((name, sbatch),) = result.sbatch_scripts.items()
    flags = _sbatch_flags(sbatch)
    # One torchrun agent per node, eight GPUs each: 16 ranks.
    assert flags["nodes"] == "2"
    assert flags["ntasks-per-node"] == "1"
    assert flags["gpus-per-node"] == "8"
    assert flags["account"] == "proj_llm" and flags["partition"] == "batch" and flags["time"] == "04:00:00"
    assert flags["signal"] == "USR1@120"  # time-limit warning -> save and requeue
    assert flags["open-mode"] == "append"  # a requeued run appends to the same log
    assert "sbatch --requeue --parsable" in sbatch
    # Rendezvous host: the first node of the allocation, exported to the steps.
    assert 'export OPD_RDZV_HOST="$head_node"' in sbatch
    assert "export TORCHELASTIC_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in sbatch
    assert "export NCCL_IB_HCA=mlx5" in sbatch and "export NCCL_SOCKET_IFNAME=ib0" in sbatch
    srun = next(line for line in sbatch.splitlines() if line.startswith("srun "))
    assert f"--container-image {IMAGE}" in srun
    mounts = srun.split("--container-mounts ", 1)[1].split()[0].split(",")
    assert mounts[:2] == ["/lustre/data:/data", "/lustre/ckpt:/ckpt"]
    assert mounts[2].endswith(":/nemo_run")  # nemo-run's job dir, where the job script lives
    assert "--container-workdir /nemo_run/code" in srun
    assert srun.endswith(f"bash /nemo_run/scripts/{name.removesuffix('_sbatch.sh')}.sh")

    (script,) = result.job_scripts.values()
    torchrun = script.splitlines()[-1]
    assert torchrun.startswith("exec python -m torch.distributed.run ")
    for part in (
        "--nnodes=2",
        "--nproc-per-node=8",
        "--rdzv-backend=c10d",
        '--rdzv-endpoint="$OPD_RDZV_HOST:29511"',
        '--rdzv-id="$SLURM_JOB_ID"',  # a requeued run gets a fresh rendezvous
        '-m opd_megatron.cli sft "$cfg"',
    ):
        assert part in torchrun
    assert "cd " not in script  # container: runs in nemo-run's code directory
    assert _heredoc_config(script) == to_dict(cfg)
    assert not (tmp_path / "experiments" / "run" / result.experiment_id).exists()  # dry run leaves nothing


def test_cpu_slurm_job_asks_for_cpus_not_gpus(tmp_path):
    cfg = load_config(
        None,
        [
            "launch.executor=slurm",
            "launch.gpus_per_node=2",
            "parallel.backend=gloo",
            "parallel.tensor_model_parallel_size=2",
            f"launch.job_dir={tmp_path}",
        ],
    )
    result = dryrun(cfg, LaunchOptions(python="/opt/venv/bin/python", preempt_warning_s=0))
    (sbatch,) = result.sbatch_scripts.values()
    flags = _sbatch_flags(sbatch)
    assert "gpus-per-node" not in flags and flags["cpus-per-task"] == "2"
    assert "account" not in flags and "signal" not in flags
    assert "--chdir " in sbatch  # no container: srun starts in the job's code directory
    (script,) = result.job_scripts.values()
    assert f"cd {os.getcwd()}" in script.splitlines()  # then the job moves to where it was submitted
    assert (
        "exec /opt/venv/bin/python -m torch.distributed.run --standalone --nnodes=1 --nproc-per-node=2"
        in script
    )


def test_mopd_one_het_job_with_teacher_servers(tmp_path):
    cfg = load_config(
        None,
        [
            *ACCEL,
            "launch.nodes=2",
            "launch.gpus_per_node=8",
            f"launch.job_dir={tmp_path}",
            "teachers=[{name: math, placement: remote, url: 'http://x:8123', checkpoint: /ck/math},"
            " {name: code, placement: remote, url: 'http://x:8124/v1', checkpoint: /ck/code},"
            " {name: ext, placement: remote, url: 'http://scorer.internal:9000'}]",
        ],
    )
    result = dryrun(cfg, LaunchOptions(command="opd", teacher_gpus_per_node=4))
    (sbatch,) = result.sbatch_scripts.values()
    assert sbatch.count("#SBATCH hetjob") == 2  # two teacher groups + the student
    groups = [_sbatch_flags(part) for part in sbatch.split("#SBATCH hetjob")]
    assert [g["nodes"] for g in groups] == ["1", "1", "2"]
    assert [g["gpus-per-node"] for g in groups] == ["4", "4", "8"]
    assert 'export OPD_TEACHER_0_HOST="$het_group_host_0"' in sbatch
    assert 'export OPD_TEACHER_1_HOST="$het_group_host_1"' in sbatch
    assert 'export OPD_RDZV_HOST="$het_group_host_2"' in sbatch
    assert [f"--het-group={i}" in sbatch for i in range(3)] == [True, True, True]

    scripts = result.job_scripts
    assert set(scripts) == {"teacher-math", "teacher-code", "student"}
    assert "--teacher math --host 0.0.0.0 --port 8123" in scripts["teacher-math"]
    assert "trap '' USR1" in scripts["teacher-code"]
    student = scripts["student"].splitlines()[-1]
    assert '"teachers.0.url=http://${OPD_TEACHER_0_HOST}:8123"' in student
    assert '"teachers.1.url=http://${OPD_TEACHER_1_HOST}:8124/v1"' in student
    assert "teachers.2" not in student  # an external teacher keeps its configured url
    assert "-m opd_megatron.cli opd" in student and "--nnodes=2" in student


def test_local_executor_runs_torchrun_standalone(tmp_path):
    cfg = load_config(None, ["launch.gpus_per_node=2", f"launch.job_dir={tmp_path}"])
    result = dryrun(cfg)
    assert result.sbatch_scripts == {}
    (script,) = result.job_scripts.values()
    assert "--standalone --nnodes=1 --nproc-per-node=2 -m opd_megatron.cli sft" in script


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="launch.nodes"):
        dryrun(load_config(None, ["launch.nodes=2", f"launch.job_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="launch.env.BAD"):
        dryrun(
            load_config(
                None, ["launch.executor=slurm", "launch.env={BAD: 'a b'}", f"launch.job_dir={tmp_path}"]
            )
        )
    with pytest.raises(ConfigError, match="command"):
        LaunchOptions(command="sft; rm -rf /")
    cfg = load_config(
        None,
        [
            "teachers=[{name: t, placement: remote, url: 'http://h:1', checkpoint: /c}]",
            f"launch.job_dir={tmp_path}",
        ],
    )
    with pytest.raises(ConfigError, match="teacher servers"):
        dryrun(cfg)


def test_job_script_runs_under_bash(tmp_path):
    """The rendered script, run by bash, hands torchrun the exact config (quoting, heredoc, overrides)."""
    stub = tmp_path / "python"
    stub.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$STUB_OUT"\n')
    stub.chmod(0o755)
    cfg = load_config(
        None,
        [
            "launch.executor=slurm",
            "launch.nodes=2",
            "launch.gpus_per_node=2",
            f"launch.job_dir={tmp_path}",
            'name=it\'s "quoted" $HOME',
            "teachers=[{name: t, placement: remote, url: 'http://h:8123', checkpoint: /c}]",
        ],
    )
    scripts = dryrun(cfg, LaunchOptions(python=str(stub), command="opd", workdir=str(tmp_path))).job_scripts
    out = tmp_path / "args"
    env = {
        **os.environ,
        "STUB_OUT": str(out),
        "SLURM_JOB_ID": "77",
        "OPD_RDZV_HOST": "node001",
        "OPD_TEACHER_0_HOST": "node009",
        "TMPDIR": str(tmp_path),
    }
    subprocess.run(["bash", "-c", scripts["student"]], env=env, check=True, timeout=30)
    args = out.read_text().splitlines()
    assert args[:2] == ["-m", "torch.distributed.run"]
    assert "--rdzv-endpoint=node001:29500" in args and "--rdzv-id=77" in args
    assert args[-1] == "teachers.0.url=http://node009:8123"
    config_path = Path(args[-2])
    assert config_path.parent == tmp_path
    reloaded = load_config(config_path)
    assert reloaded.name == 'it\'s "quoted" $HOME' and to_dict(reloaded) == to_dict(cfg)


def test_cli_dryrun_prints_scripts(tmp_path, capsys):
    from opd_megatron.cli import main

    argv = ["launch", "--dryrun", "launch.executor=slurm", "launch.nodes=2", "launch.gpus_per_node=8"]
    assert main([*argv, f"launch.job_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --nodes=2" in out and "--nproc-per-node=8" in out


def test_cli_reports_config_errors(capsys):
    from opd_megatron.cli import main

    assert main(["launch", "--dryrun", "launch.nodes=0"]) == 2
    assert "launch.nodes" in capsys.readouterr().err


@pytest.mark.parametrize("exit_code, state", [(0, "SUCCEEDED"), (3, "FAILED")])
def test_local_launch_runs_the_job_script_and_reports_its_state(tmp_path, exit_code, state):
    """A real nemo-run local execution, with a stand-in interpreter in place of torchrun."""
    from opd_megatron.launch import launch

    stub = tmp_path / "python"
    stub.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path / "args"}\nexit {exit_code}\n')
    stub.chmod(0o755)
    cfg = load_config(None, ["launch.gpus_per_node=2", f"launch.job_dir={tmp_path / 'jobs'}"])
    result = launch(cfg, LaunchOptions(python=str(stub), workdir=str(tmp_path)), wait=True)
    assert result.states == [state]
    args = (tmp_path / "args").read_text().splitlines()
    assert args[:4] == ["-m", "torch.distributed.run", "--standalone", "--nnodes=1"]
    assert args[-3:-1] == ["opd_megatron.cli", "sft"]
