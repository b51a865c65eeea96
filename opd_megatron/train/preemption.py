"""Graceful preemption: turn SIGTERM / SIGUSR1 / SIGINT into "save a checkpoint, then stop (and requeue)".

Clusters stop jobs with a signal and a grace period: SLURM sends SIGTERM on preemption (``GraceTime``
seconds before SIGKILL) and on ``scancel`` (``KillWait`` seconds before), and ``#SBATCH --signal=USR1@120`` sends SIGUSR1 that long before
the time limit. Ctrl-C (SIGINT) does the same for a run in a terminal: the first one saves and stops
after the current step, a second one aborts (``KeyboardInterrupt`` as soon as the main thread runs Python
code again) without saving. A signal handler must not save a Megatron checkpoint itself (it would run in
the middle of a collective), so the handler only sets a flag; the trainer polls it once per step.

Contract with the trainer::

    handler = PreemptionHandler.install()          # before the training loop, in every rank
    for step in ...:
        train_step(...)
        if handler.sync(group):                    # all ranks agree on the same step
            path = save_checkpoint(...)            # collective save, as for a periodic checkpoint
            handler.finish(path)                   # NoReturn

:meth:`PreemptionHandler.finish` then does, on the global main rank only:

* under SLURM (``SLURM_JOB_ID`` set) when the job may be requeued (``scontrol show job`` reports
  ``Requeue=1``, i.e. ``sbatch --requeue`` or the cluster default ``JobRequeue=1``): run
  ``scontrol requeue $SLURM_JOB_ID``. SLURM ends this run and puts the *same* job id back in the
  queue; when it starts again, ``SLURM_RESTART_COUNT`` is set and the trainer resumes from the latest
  checkpoint (``train.resume: true``). The job must therefore write its output with
  ``--open-mode=append`` to keep the first run's log. A job the user cancelled with plain ``scancel``
  is already CANCELLED, so its requeue is refused and it stays cancelled, as the user asked.
* otherwise: nothing; the caller (a person, a wrapper script) sees the exit code and reruns.

Several runs in one process (a pipeline of stages): each run installs a handler for its training loop and
uninstalls it when the run ends (handlers, signal mask and fork hook back as they were, so nothing of one
run's shield stays with the processes started between or after runs). A request that arrived too late
for its run to act on (during the last step, the final evaluation or save) is not dropped: ``uninstall(
keep_request=True)`` hands it to the next handler installed in this process, whose run then stops before
its first step. Between runs the previous handlers are in force (Python's: Ctrl-C raises
``KeyboardInterrupt``, SIGTERM ends the process), so a stop request then stops the process at once.

Every rank then exits with :data:`EXIT_PREEMPTED` (75, ``EX_TEMPFAIL`` of sysexits.h: "temporary
failure, retry"), so a stop after a signal is never mistaken for a finished run (0) or a crash (1).
Under torchrun, torchrun itself reports the workers' exit as a failure and exits non-zero.

Helper processes: SLURM signals *every* process of a job step, including helpers a rank started
(Megatron's distributed checkpointing keeps a spawned ``multiprocessing`` manager for its writes;
data-loader workers). Killed by the signal, they take the final save down with them. So
:meth:`PreemptionHandler.install` also blocks the stop signals in the calling (main) thread, a mask that
every process started from it afterwards inherits (fork and spawn alike), and unblocks them in one
small receiver thread, so this process still sees them while its helpers do not. Install the handler
before anything starts helper processes; a helper started earlier stays exposed.

No orphans: a helper must not outlive its trainer (after a ``kill -9`` or an OOM kill nothing else will
stop it). For every process *forked* after :meth:`PreemptionHandler.install` (Megatron's checkpoint
write workers, fork-mode data-loader workers), a fork hook asks Linux for ``SIGKILL`` when its parent dies
(``prctl(PR_SET_PDEATHSIG)``) and restores the signal mask of before the install: the child keeps the
inherited Python handler, which only sets a flag, so a job-wide SIGTERM still does not kill it, and a
plain ``kill`` of it works again once it is no longer a helper. Processes started by *exec* (spawn-mode
multiprocessing, ``subprocess``) run no hook: they inherit the blocked mask and no death signal, so they
must handle that themselves (``serve-teacher`` unblocks its stop signals; the checkpoint saver avoids
Megatron's spawned Manager process altogether, see ``opd_megatron.models.checkpoint``).

torchrun and signals: the torchrun agent forwards SIGTERM, SIGINT, SIGHUP and SIGQUIT to its workers and
SIGKILLs them 30 s later; SIGUSR1 *kills torchrun* unless ``TORCHELASTIC_SIGNALS_TO_HANDLE`` lists it.
The launchers in ``opd_megatron.launch`` and ``slurm/`` set that variable. As SLURM signals torchrun
too, the final save must fit in those 30 s (and in the cluster's grace period).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from types import FrameType
from typing import NoReturn

__all__ = [
    "DEFAULT_SIGNALS",
    "EXIT_PREEMPTED",
    "PreemptionHandler",
    "request_slurm_requeue",
    "set_parent_death_signal",
    "slurm_job_id",
    "slurm_requeue_allowed",
]

EXIT_PREEMPTED = 75
"""Exit code of a run that stopped on a signal after saving its checkpoint (sysexits ``EX_TEMPFAIL``)."""

DEFAULT_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _load_prctl():
    """libc's ``prctl``, resolved once in the parent: a forked child must not load libraries (another
    thread may have held the loader's lock at the fork)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


_PRCTL = _load_prctl()


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Have Linux send ``sig`` to this process when the thread that started it exits (the parent's
    main thread, for a process forked from it). False where that is not available."""
    return _PRCTL is not None and _PRCTL(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


class _ForkGuard:
    """What the fork hooks need; ``mask`` is None while no handler is installed (the hooks, registered
    once per process, cannot be removed)."""

    mask: set[signal.Signals] | None = None
    registered = False
    parent_pid = 0
    from_main_thread = False

    @classmethod
    def before_fork(cls) -> None:
        cls.parent_pid = os.getpid()
        cls.from_main_thread = threading.current_thread() is threading.main_thread()

    @classmethod
    def after_fork_in_child(cls) -> None:
        if cls.mask is None:
            return
        # The death signal follows the forking *thread*: only the main thread lives as long as the process.
        if (
            cls.from_main_thread
            and set_parent_death_signal(signal.SIGKILL)
            and os.getppid() != cls.parent_pid
        ):
            os._exit(1)  # the parent died before the request took effect
        signal.pthread_sigmask(signal.SIG_SETMASK, cls.mask)

    @classmethod
    def activate(cls, mask: set[signal.Signals] | None) -> None:
        if not cls.registered and hasattr(os, "register_at_fork"):
            os.register_at_fork(before=cls.before_fork, after_in_child=cls.after_fork_in_child)
            cls.registered = True
        cls.mask = mask


_SCONTROL_TIMEOUT_S = 30


def slurm_job_id() -> str | None:
    """The id of the enclosing SLURM job, or None outside SLURM."""
    # Array tasks are requeued by their own id, which SLURM_JOB_ID already is.
    return os.environ.get("SLURM_JOB_ID") or None


def slurm_requeue_allowed(job_id: str) -> bool:
    """Whether SLURM would accept ``scontrol requeue`` for this job (``Requeue=1`` in its record)."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "job", "--oneliner", job_id],
            capture_output=True,
            text=True,
            timeout=_SCONTROL_TIMEOUT_S,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return any(tok == "Requeue=1" for tok in out.split())


def request_slurm_requeue(job_id: str) -> bool:
    """Ask SLURM to requeue ``job_id``. Returns True when ``scontrol`` accepted it."""
    try:
        proc = subprocess.run(
            ["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=_SCONTROL_TIMEOUT_S
        )
    except (OSError, subprocess.SubprocessError) as e:
        print(f"[preemption] scontrol requeue {job_id} failed: {e}", file=sys.stderr, flush=True)
        return False
    if proc.returncode != 0:
        print(
            f"[preemption] scontrol requeue {job_id} refused: {proc.stderr.strip() or proc.stdout.strip()}",
            file=sys.stderr,
            flush=True,
        )
        return False
    return True


class PreemptionHandler:
    """Records that a stop signal arrived; the training loop decides when to act on it.

    Use :meth:`install` (not the constructor) so the previous handlers are kept for :meth:`uninstall`.
    """

    _kept: tuple[signal.Signals | None] | None = None
    """A request an uninstalled handler passed on (its signal, None for :meth:`request`), for the next
    handler this process installs."""

    def __init__(self, signals: Iterable[signal.Signals] = DEFAULT_SIGNALS):
        self.signals: tuple[signal.Signals, ...] = tuple(signal.Signals(s) for s in signals)
        self._event = threading.Event()
        self._pid = os.getpid()
        self._received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}
        self._previous_mask: set[signal.Signals] | None = None
        self._receiver_stop: threading.Event | None = None
        self._receiver: threading.Thread | None = None
        self._acted = False
        """:meth:`finish` ran: the request was acted on, so nothing is handed to the next handler."""

    @classmethod
    def install(
        cls, signals: Iterable[signal.Signals] = DEFAULT_SIGNALS, *, shield_children: bool = True
    ) -> PreemptionHandler:
        """Install handlers for ``signals`` (main thread only, as Python requires) and return them.

        With ``shield_children`` (the default), processes this thread starts from now on inherit the
        signals blocked, so a job-wide SIGTERM reaches this process but not its helpers (module doc).
        """
        handler = cls(signals)
        if PreemptionHandler._kept is not None:  # a request the previous run could not act on
            (handler._received,) = PreemptionHandler._kept
            PreemptionHandler._kept = None
            handler._event.set()
        for sig in handler.signals:
            handler._previous[sig] = signal.signal(sig, handler._on_signal)
        if shield_children:
            handler._shield_children()
        return handler

    def _shield_children(self) -> None:
        # CPython's resource tracker, started lazily with the first spawned process, blocks SIGTERM while it
        # starts and then *unblocks* it, which would undo our block; started now, it never does that again.
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()
        # Block first, then start the receiver: it inherits the block and lifts it for itself only, so a
        # signal arriving in between stays pending and is delivered to it; none is lost.
        self._previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, self.signals)
        _ForkGuard.activate(set(self._previous_mask))
        stop = threading.Event()

        def receive() -> None:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, self.signals)
            # The kernel delivers the signal to this thread; Python then runs _on_signal in the main thread.
            stop.wait()

        self._receiver_stop = stop
        self._receiver = threading.Thread(target=receive, name="preemption-signal-receiver", daemon=True)
        self._receiver.start()

    def uninstall(self, *, keep_request: bool = False) -> None:
        """Restore the handlers and the signal mask that were active before :meth:`install`.

        With ``keep_request``, a stop request this handler received is handed to the next handler
        installed in this process (the caller did not act on it: its run had already finished)."""
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)  # type: ignore[arg-type]
        self._previous.clear()
        # After the handlers are back: a signal from now on meets them, one before is in the flag.
        if keep_request and self.requested and not self._acted:
            PreemptionHandler._kept = (self._received,)
        if self._previous_mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._previous_mask)
            self._previous_mask = None
            _ForkGuard.activate(None)
        if self._receiver_stop is not None and self._receiver is not None:
            self._receiver_stop.set()
            self._receiver.join(timeout=5)
            self._receiver_stop = self._receiver = None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only set a flag: the interrupted code may be inside a collective or a file write.
        # A forked helper inherited this handler: the signal is not its to act on.
        if os.getpid() != self._pid:
            return
        if signum == signal.SIGINT and threading.current_thread() is threading.main_thread():
            if self._received == signal.SIGINT:  # Ctrl-C twice: the user wants out now, unsaved
                raise KeyboardInterrupt
            if self._received is None:
                print(
                    "\n[preemption] Ctrl-C: saving a checkpoint after this step, then stopping "
                    "(Ctrl-C again to abort without saving)",
                    file=sys.stderr,
                    flush=True,
                )
        if self._received is None:
            self._received = signal.Signals(signum)
        self._event.set()

    @property
    def requested(self) -> bool:
        """True once a stop signal reached this process (or :meth:`sync` learnt of one on another rank)."""
        return self._event.is_set()

    @property
    def received_signal(self) -> signal.Signals | None:
        """The first signal this process received, if any."""
        return self._received

    def request(self) -> None:
        """Ask for a stop as if a signal had arrived (tests, or a trainer's own deadline)."""
        self._event.set()

    def sync(self, group: object | None = None) -> bool:
        """Agree across ranks whether to stop now: True on every rank if any rank was signalled.

        SLURM signals the processes of a job at slightly different times, so one rank can see the
        flag a step before another; acting on the local flag alone would leave the others waiting in
        the next step's collective. Costs one scalar all-reduce; without torch.distributed it is just
        :attr:`requested`.
        """
        if self._previous_mask is not None and threading.current_thread() is threading.main_thread():
            # Other code may have unblocked the signals since install; renew the block (one syscall).
            signal.pthread_sigmask(signal.SIG_BLOCK, self.signals)
        dist = sys.modules.get("torch.distributed")  # never imported: cannot be initialised either
        if dist is None or not (dist.is_available() and dist.is_initialized()):
            return self.requested
        import torch

        device = (
            torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None
        )
        flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        if int(flag.item()):
            self._event.set()
        return self.requested

    def finish(self, checkpoint: str | Path | None = None, *, rank: int | None = None) -> NoReturn:
        """Stop after the checkpoint is saved: requeue under SLURM (main rank), then exit.

        Call it on every rank after the collective save has returned everywhere. ``rank`` defaults to the
        torch.distributed global rank (0 without torch.distributed). Exits with :data:`EXIT_PREEMPTED`.
        """
        self._acted = True
        if rank is None:
            rank = _global_rank()
        sig = self._received.name if self._received is not None else "a stop request"
        if rank == 0:
            where = f" after saving {checkpoint}" if checkpoint is not None else ""
            print(f"[preemption] stopping on {sig}{where}", file=sys.stderr, flush=True)
            job = slurm_job_id()
            if job is not None:
                if slurm_requeue_allowed(job):
                    if request_slurm_requeue(job):
                        print(f"[preemption] requeued SLURM job {job}", file=sys.stderr, flush=True)
                else:
                    print(
                        f"[preemption] SLURM job {job} does not allow requeue (submit with --requeue); "
                        "resubmit it to resume",
                        file=sys.stderr,
                        flush=True,
                    )
        sys.stdout.flush()
        sys.stderr.flush()
        sys.exit(EXIT_PREEMPTED)


def _global_rank() -> int:
    dist = sys.modules.get("torch.distributed")  # not imported: no process group, and no import cost
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0
