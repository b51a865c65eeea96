"""PreemptionHandler: signal -> flag, cross-rank agreement, and the exit / requeue contract."""

from __future__ import annotations

import contextlib
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


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_subprocess_saves_then_exits_with_preempted_code(tmp_path, sig):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = _start_trainer(tmp_path, env)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == EXIT_PREEMPTED, err
    assert (tmp_path / "saved").exists()
    assert f"stopping on {sig.name}" in err
    assert "requeue" not in err  # not under SLURM: nothing to requeue
    assert ("Ctrl-C again to abort" in err) == (sig == signal.SIGINT)


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


# A step that takes long (no poll of the flag for a minute): the second Ctrl-C must not wait for it. It
# takes effect when the main thread next runs Python code (the signal arrives on the receiver thread).
_LONG_STEP = textwrap.dedent(
    """
    import sys, time
    from opd_megatron.train.preemption import PreemptionHandler
    handler = PreemptionHandler.install()
    print("ready", flush=True)
    try:
        for _ in range(1200):
            time.sleep(0.05)
    except KeyboardInterrupt:
        print("aborted", flush=True)
        sys.exit(130)
    sys.exit(0)
    """
)


def test_a_second_ctrl_c_aborts_without_saving(tmp_path):
    script = tmp_path / "long_step.py"
    script.write_text(_LONG_STEP)
    proc = subprocess.Popen([sys.executable, str(script)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert proc.poll() is None  # the first one only asks for a save at the end of the step
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and out.strip() == "aborted", err
    assert err.count("Ctrl-C again to abort") == 1


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper that never comes, as in some containers, is dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _blocked(pid: int, tid: int | None = None) -> set[int]:
    """Signals blocked in ``pid`` (its thread ``tid``), from /proc."""
    status = Path(f"/proc/{pid}/task/{tid or pid}/status").read_text()
    mask = int(next(line for line in status.splitlines() if line.startswith("SigBlk:")).split()[1], 16)
    return {sig for sig in range(1, 65) if mask >> (sig - 1) & 1}


# A trainer that forks a helper after installing the handler (as Megatron's checkpoint writer does).
_FORKING_TRAINER = textwrap.dedent(
    """
    import multiprocessing as mp, os, time
    from opd_megatron.train.preemption import PreemptionHandler

    def helper():
        time.sleep(120)

    if __name__ == "__main__":
        handler = PreemptionHandler.install()
        child = mp.get_context("fork").Process(target=helper)
        child.start()
        print(child.pid, flush=True)
        time.sleep(120)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal and /proc are Linux")
def test_a_forked_helper_has_its_mask_restored_and_dies_with_a_killed_parent(tmp_path):
    script = tmp_path / "forking.py"
    script.write_text(_FORKING_TRAINER)
    proc = subprocess.Popen([sys.executable, str(script)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        child = int(proc.stdout.readline())
        assert signal.SIGTERM in _blocked(proc.pid)  # the trainer's main thread shields its helpers...
        # ...a forked one unblocks (in its after-fork hook, which may run after the parent read the pid)
        stops = {signal.SIGTERM, signal.SIGUSR1, signal.SIGINT}
        deadline = time.monotonic() + 5
        while stops & _blocked(child) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not stops & _blocked(child)
        os.kill(child, signal.SIGTERM)  # a job-wide SIGTERM: the inherited handler only sets a flag
        time.sleep(0.5)
        assert _alive(child)
        proc.kill()  # kill -9 of the trainer
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), "the helper outlived its killed parent"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# A trainer that saves real checkpoints in a loop, for a kill -9 in the middle of one.
_SAVING_TRAINER = textwrap.dedent(
    """
    import sys
    from opd_megatron.train.preemption import PreemptionHandler

    if __name__ == "__main__":
        handler = PreemptionHandler.install()
        from opd_megatron.config import ModelConfig, ParallelConfig, RunConfig
        from opd_megatron.distributed import init_distributed
        from opd_megatron.models.checkpoint import save_checkpoint
        from opd_megatron.models.gpt import build_gpt_model

        groups = init_distributed(ParallelConfig())
        cfg = RunConfig(model=ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4))
        model = build_gpt_model(cfg.model, groups, 64, seed=1)
        for step in range(1, 1000):
            save_checkpoint(sys.argv[1], step, model, groups, config=cfg, rank_state={"step": step}, job="sft")
            print(f"saved {step}", flush=True)
    """
)


def _processes_with(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if marker.encode() in environ.split(b"\0") and _alive(int(entry)):
            found.append(int(entry))
    return found


@pytest.mark.timeout(300)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal and /proc are Linux")
def test_no_process_survives_a_kill_9_during_checkpoint_saves(tmp_path):
    import random
    import uuid

    marker = f"OPD_ORPHAN_TEST={uuid.uuid4().hex}"
    script = tmp_path / "saving.py"
    script.write_text(_SAVING_TRAINER)
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update([marker.split("=", 1)], OMP_NUM_THREADS="1")
    rng = random.Random(7)
    for attempt in range(2):  # two kills, at different points of a save
        proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / f"ckpt{attempt}")], cwd=REPO,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
        try:
            for _ in range(2):
                assert proc.stdout.readline().startswith("saved"), "the trainer stopped saving"
            helpers = [p for p in _processes_with(marker) if p != proc.pid]
            cmdlines = [Path(f"/proc/{p}/cmdline").read_bytes() for p in helpers if _alive(p)]
            managers = [c for c in cmdlines if b"spawn_main" in c]
            time.sleep(rng.uniform(0.0, 0.5))
            proc.kill()
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        deadline = time.monotonic() + 15
        while _processes_with(marker) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = _processes_with(marker)
        details = {p: Path(f"/proc/{p}/cmdline").read_bytes()[:200] for p in survivors}
        for pid in survivors:  # do not leave them behind when the test fails
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        assert not survivors, f"processes outlived the killed trainer: {details}"
        assert not managers, "a spawned Manager process was started"
