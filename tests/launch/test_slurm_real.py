"""A real one-node SLURM cluster on localhost: submit through nemo-run, preempt, requeue, resume.

The cluster (``tools/slurm_local.py``) lives for the test session and is stopped by the fixture's
finalizer even when a test fails. Each test submits a 2-process TP=2 gloo SFT run through nemo-run's
SlurmExecutor over a local tunnel, running this checkout with the current interpreter.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from opd_megatron.config import load_config
from opd_megatron.launch import LaunchOptions, job_info, launch, wait_for_job

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
STEPS = 6
JOB_TIMEOUT_S = 300


def _slurm_local():
    spec = importlib.util.spec_from_file_location("slurm_local", REPO / "tools" / "slurm_local.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def slurm_cluster():
    sl = _slurm_local()
    if sl.missing_binaries():
        sl.install_packages()
    # Not under pytest's private (0700) temp dir: munged needs a socket path every user can reach.
    root = Path(tempfile.mkdtemp(prefix="opd-slurm-"))
    cluster = sl.up(root)
    saved = os.environ.get("SLURM_CONF")
    # nemo-run's tunnel runs sbatch with our environment; the job inherits it (scontrol requeue).
    os.environ["SLURM_CONF"] = cluster.conf
    try:
        yield cluster
    finally:
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved
        sl.down(root, remove=True)


@pytest.fixture(autouse=True)
def no_leftover_jobs(slurm_cluster):
    """After each test, cancel its jobs and kill job processes that escaped (a failed test must not
    leave workers that slow down or block the next one)."""
    yield
    sl = _slurm_local()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        sl._cancel_jobs(slurm_cluster.conf, 40.0)
    sl.kill_job_processes(slurm_cluster.conf)


def test_local_cluster_runs_a_wrap_job(slurm_cluster, tmp_path):
    """The cluster itself: the node is idle and a trivial batch job runs (fast failure diagnosis)."""
    env = slurm_cluster.client_env()
    state = subprocess.run(["sinfo", "--noheader", "--format=%T"], env=env, capture_output=True, text=True)
    assert state.stdout.strip() == "idle"
    out = tmp_path / "wrap.out"
    submit = subprocess.run(
        ["sbatch", "--parsable", f"--output={out}", "--wrap", "echo node=$SLURMD_NODENAME"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    info = wait_for_job(submit.stdout.strip(), 60, env=env, poll_s=0.2)
    assert info.state == "COMPLETED" and info.exit_code == "0:0"
    assert out.read_text().strip() == f"node={slurm_cluster.node}"


def _tiny_run(tmp_path: Path, cluster, name: str):
    return load_config(
        None,
        [
            f"name={name}",
            "model.num_layers=2",
            "model.hidden_size=64",
            "parallel.tensor_model_parallel_size=2",
            "parallel.backend=gloo",
            "parallel.timeout_s=120",
            f"train.steps={STEPS}",
            "train.save_every=2",
            "train.keep_last=10",
            "train.eval_every=0",
            "train.eval_samples=4",
            "train.micro_batch_size=4",
            "train.progress=false",
            f"train.output_dir={tmp_path / 'out'}",
            "data.train_size=100",
            "data.eval_size=10",
            "launch.executor=slurm",
            "launch.gpus_per_node=2",
            f"launch.partition={cluster.partition}",
            "launch.time=00:15:00",
            f"launch.job_dir={tmp_path / 'jobs'}",
            "launch.env={OMP_NUM_THREADS: '1'}",
        ],
    )


def _options() -> LaunchOptions:
    return LaunchOptions(python=sys.executable, workdir=str(REPO))


def _train_steps(out: Path) -> list[int]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["step"] for r in rows if r["kind"] == "train"]


def _logs(tmp_path: Path) -> str:
    return "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')}" for p in sorted(tmp_path.rglob("*.out"))
    )


def test_sft_job_completes_with_checkpoint_and_metrics(slurm_cluster, tmp_path):
    t0 = time.monotonic()
    cfg = _tiny_run(tmp_path, slurm_cluster, "slurm-sft")
    result = launch(cfg, _options())
    (job_id,) = result.job_ids
    info = wait_for_job(job_id, JOB_TIMEOUT_S, poll_s=0.5)
    assert info.state == "COMPLETED", f"{info}\n{_logs(tmp_path)}"
    assert info.restarts == 0

    out = tmp_path / "out"
    assert _train_steps(out) == list(range(1, STEPS + 1))
    final = out / "checkpoints" / f"step_{STEPS:07d}"
    assert (final / "meta.json").exists(), _logs(tmp_path)
    assert json.loads((final / "meta.json").read_text())["step"] == STEPS
    print(f"\nSLURM SFT job {job_id}: submitted to COMPLETED in {time.monotonic() - t0:.1f}s")


def test_sigterm_requeues_and_resumes_without_losing_or_repeating_steps(slurm_cluster, tmp_path):
    t0 = time.monotonic()
    cfg = _tiny_run(tmp_path, slurm_cluster, "slurm-preempt")
    result = launch(cfg, _options())
    (job_id,) = result.job_ids
    out = tmp_path / "out"

    # Signal once the trainer is in its step loop (its handler is installed before the first step).
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not ((out / "metrics.jsonl").exists() and _train_steps(out)):
        assert not job_info(job_id).done, f"job ended before training\n{_logs(tmp_path)}"
        assert time.monotonic() < deadline, f"no training step logged\n{_logs(tmp_path)}"
        time.sleep(0.2)
    first_seen = _train_steps(out)[-1]
    # As SLURM preemption and `scancel --signal` do: SIGTERM to every process of the job's steps
    # (torchrun and both ranks), not to the batch script.
    subprocess.run(["scancel", "--signal=TERM", job_id], check=True, env=slurm_cluster.client_env())

    info = wait_for_job(job_id, JOB_TIMEOUT_S, poll_s=0.5)
    logs = _logs(tmp_path)
    assert info.state == "COMPLETED", f"{info}\n{logs}"
    assert info.restarts == 1, f"{info}\n{logs}"

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    preempted = [r for r in rows if r["kind"] == "preempted"]
    assert len(preempted) == 1, logs
    stop_step = preempted[0]["step"]
    assert first_seen <= stop_step < STEPS
    # Every step exactly once across the two runs: none lost, none repeated.
    assert _train_steps(out) == list(range(1, STEPS + 1)), logs
    assert (out / "checkpoints" / f"step_{stop_step:07d}" / "meta.json").exists()
    assert (out / "checkpoints" / f"step_{STEPS:07d}" / "meta.json").exists()
    assert "stopping on SIGTERM" in logs and f"requeued SLURM job {job_id}" in logs
    assert f"resuming at step {stop_step}" in logs
    print(
        f"\nSLURM preemption job {job_id}: stopped at step {stop_step}, requeued, completed in "
        f"{time.monotonic() - t0:.1f}s"
    )


def test_plain_sbatch_template_runs(slurm_cluster, tmp_path):
    """slurm/train.sbatch, submitted with plain sbatch, on a CPU node: 2 gloo ranks, TP=2."""
    t0 = time.monotonic()
    out = tmp_path / "out"
    env = {
        **slurm_cluster.client_env(),
        "OPD_PYTHON": sys.executable,
        "OPD_WORKDIR": str(REPO),
        "OPD_NPROC_PER_NODE": "2",
        "OMP_NUM_THREADS": "1",
    }
    overrides = [
        "model.num_layers=2",
        "model.hidden_size=64",
        "parallel.tensor_model_parallel_size=2",
        "parallel.backend=gloo",
        "train.steps=2",
        "train.eval_every=0",
        "train.eval_samples=4",
        "train.micro_batch_size=4",
        "train.progress=false",
        f"train.output_dir={out}",
        "data.train_size=100",
        "data.eval_size=10",
    ]
    log = tmp_path / "job.out"
    submit = subprocess.run(
        ["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=2", f"--output={log}"]
        + [str(REPO / "slurm" / "train.sbatch"), "sft", *overrides],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    job_id = submit.stdout.strip().split(";")[0]
    info = wait_for_job(job_id, JOB_TIMEOUT_S, poll_s=0.5)
    text = log.read_text(errors="replace") if log.exists() else ""
    assert info.state == "COMPLETED", f"{info}\n{text}"
    assert "1 node(s) x 2 ranks" in text
    assert _train_steps(out) == [1, 2]
    assert (out / "checkpoints" / "step_0000002" / "meta.json").exists()
    print(f"\nplain sbatch template job {job_id}: submitted to COMPLETED in {time.monotonic() - t0:.1f}s")
