"""PreemptionHandler: signal -> flag, cross-rank agreement, and the exit / requeue contract."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from opd_megatron.train.preemption import EXIT_PREEMPTED, PreemptionHandler
from tests.multirank import run_ranks

REPO = Path(__file__).resolve().parents[2]


def test_signal_sets_flag_and_uninstall_restores():
    before = signal.getsignal(signal.SIGUSR1)
    handler = PreemptionHandler.install(signals=(signal.SIGUSR1,))
    try:
        assert not handler.requested and handler.received_signal is None
        os.kill(os.getpid(), signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while not handler.requested and time.monotonic() < deadline:
            time.sleep(0.01)
        assert handler.requested
        assert handler.received_signal == signal.SIGUSR1
        assert handler.sync() is True  # no torch.distributed: the local flag
    finally:
        handler.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == before


# A stand-in trainer: a step loop that polls the flag, "saves", and finishes.
_TRAINER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from opd_megatron.train.preemption import PreemptionHandler
    out = Path(sys.argv[1])
    handler = PreemptionHandler.install()
    print("ready", flush=True)
    for step in range(1, 2000):
        time.sleep(0.01)
        if handler.sync():
            (out / "saved").write_text(str(step))
            handler.finish(out / "saved")
    sys.exit(0)
    """
)


def _start_trainer(tmp_path: Path, env: dict[str, str]) -> subprocess.Popen:
    script = tmp_path / "trainer.py"
    script.write_text(_TRAINER)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_subprocess_saves_then_exits_with_preempted_code(tmp_path, sig):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = _start_trainer(tmp_path, env)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == EXIT_PREEMPTED, err
    assert (tmp_path / "saved").exists()
    assert f"stopping on {sig.name}" in err
    assert "requeue" not in err  # not under SLURM: nothing to requeue


# A rank with a spawned helper process, like Megatron's checkpoint writer keeps: the whole process group
# gets SIGTERM (as SLURM signals every process of a step); the helper must survive for the final save.
_TRAINER_WITH_HELPER = textwrap.dedent(
    """
    import multiprocessing as mp, sys, time
    from pathlib import Path
    from opd_megatron.train.preemption import PreemptionHandler
    if __name__ == "__main__":
        out = Path(sys.argv[1])
        handler = PreemptionHandler.install()
        manager = mp.get_context("spawn").Manager()
        queue = manager.Queue()
        print("ready", flush=True)
        for step in range(1, 20000):
            time.sleep(0.01)
            if handler.sync():
                queue.put(step)  # the "save" goes through the helper process
                (out / "saved").write_text(str(queue.get()))
                handler.finish(out / "saved")
        sys.exit(0)
    """
)


def test_helper_processes_survive_a_job_wide_sigterm(tmp_path):
    script = tmp_path / "trainer_helper.py"
    script.write_text(_TRAINER_WITH_HELPER)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    os.killpg(proc.pid, signal.SIGTERM)  # every process of the group, helper included
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_PREEMPTED, err
    assert int((tmp_path / "saved").read_text()) >= 1


def test_uninstall_restores_signal_mask():
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    handler = PreemptionHandler.install()
    assert signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    handler.uninstall()
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before


def _fake_scontrol(bin_dir: Path, log: Path, requeue_flag: int) -> None:
    """A ``scontrol`` that logs its arguments and reports ``Requeue=<flag>`` for ``show job``."""
    bin_dir.mkdir()
    exe = bin_dir / "scontrol"
    exe.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {log}\n'
        f'if [ "$1" = show ]; then echo "JobId=$4 JobName=x Requeue={requeue_flag} Restarts=0"; fi\n'
    )
    exe.chmod(0o755)


@pytest.mark.parametrize("requeue_flag", [1, 0])
def test_finish_requeues_under_slurm_only_when_allowed(tmp_path, requeue_flag):
    log = tmp_path / "scontrol.log"
    _fake_scontrol(tmp_path / "bin", log, requeue_flag)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_JOB_ID="4242", PATH=f"{tmp_path / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    proc = _start_trainer(tmp_path, env)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == EXIT_PREEMPTED, err
    calls = log.read_text().splitlines()
    assert calls[0] == "show job --oneliner 4242"
    if requeue_flag:
        assert calls[1:] == ["requeue 4242"]
        assert "requeued SLURM job 4242" in err
    else:
        assert calls[1:] == []
        assert "does not allow requeue" in err


def _sync_rank(rank: int) -> tuple[bool, bool]:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    handler = PreemptionHandler()  # no OS handlers in spawned test ranks; request() stands in for a signal
    first = handler.sync()
    if rank == 1:
        handler.request()
    second = handler.sync()
    return first, second


def test_sync_agrees_across_ranks():
    assert run_ranks(_sync_rank, world_size=2, timeout=120) == [(False, True), (False, True)]
