#!/usr/bin/env python3
"""Bring up (and tear down) a one-node SLURM cluster on localhost, for tests and for trying the launchers.

    sudo python3 tools/slurm_local.py up   --dir /tmp/opd-slurm     # prints: export SLURM_CONF=...
    SLURM_CONF=/tmp/opd-slurm/slurm.conf sbatch --wrap 'hostname'
    sudo python3 tools/slurm_local.py down --dir /tmp/opd-slurm

Needs root and the Debian packages ``slurm-wlm`` and ``munge`` (``install`` runs apt-get for them).
Everything lives under one directory: ``slurm.conf``, a fresh munge key and socket, controller state,
slurmd spool and logs. Nothing under ``/etc`` is touched, so the clients find this cluster only through
``SLURM_CONF``; a system SLURM or munge on the same machine is left alone.

The three daemons run in the foreground of processes this script starts in their own session, so their
pids are known exactly; ``down`` cancels the remaining jobs, then stops only those pids (after checking
each still runs the command it started) and leaves every other process alone. Standard library only,
so it runs before any virtual environment exists.

Configuration choices (each needed for a single unprivileged-container-like host):
``ProctrackType=proctrack/linuxproc`` and ``TaskPlugin=task/none`` avoid cgroups; ``SelectType=
select/cons_tres`` with ``CR_Core`` lets several jobs share the node; ``SlurmUser=root``; non-default
ports picked free at start; ``AuthInfo=cred_expire`` short so a requeued job restarts in seconds
(SLURM holds a requeued job for the credential lifetime, 120 s by default).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

STATE_FILE = "cluster.json"
DAEMONS = ("munged", "slurmctld", "slurmd")
PACKAGES = ("slurm-wlm", "munge")
# Unix socket paths are limited to 107 bytes; the munge socket lives under the cluster directory.
_MAX_SOCKET_PATH = 100


@dataclass
class LocalCluster:
    """A running one-node cluster: where its files are and which processes are its daemons."""

    root: str
    conf: str
    node: str
    partition: str
    cpus: int
    ctld_port: int
    slurmd_port: int
    pids: dict[str, int]
    cmdlines: dict[str, list[str]]

    @property
    def env(self) -> dict[str, str]:
        """Environment that points SLURM clients (sbatch, squeue, scontrol) at this cluster."""
        return {"SLURM_CONF": self.conf}

    def client_env(self) -> dict[str, str]:
        return {**os.environ, **self.env}

    def save(self) -> None:
        Path(self.root, STATE_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, root: str | Path) -> LocalCluster:
        return cls(**json.loads(Path(root, STATE_FILE).read_text()))


def missing_binaries() -> list[str]:
    return [b for b in (*DAEMONS, "mungekey", "sbatch", "sinfo", "scontrol") if shutil.which(b) is None]


def install_packages() -> None:
    """apt-get install the packages (root); refreshes the package lists only when the first try fails."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-qq", *PACKAGES]
    if subprocess.run(cmd, env=env).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=True)
        subprocess.run(cmd, env=env, check=True)


def _free_ports(n: int) -> list[int]:
    # Keep all sockets open until every port is chosen, so the n ports differ.
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _memory_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def _slurm_conf(
    root: Path,
    node: str,
    partition: str,
    cpus: int,
    memory_mb: int,
    ctld_port: int,
    slurmd_port: int,
    cred_expire_s: int,
) -> str:
    return f"""\
# One-node cluster written by tools/slurm_local.py; everything lives under {root}.
ClusterName=opdlocal
SlurmctldHost={node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire={cred_expire_s}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName={partition} Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def _spawn(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    # Own session: a Ctrl-C or SIGHUP aimed at the caller's terminal does not reach the daemons.
    with open(log, "ab") as out:
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def _wait(predicate, timeout_s: float, what: str, procs: dict[str, subprocess.Popen]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for name, p in procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with code {p.returncode} while waiting for {what}")
        if predicate():
            return
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def _node_state(conf: str) -> str:
    out = subprocess.run(
        ["sinfo", "--noheader", "--Node", "--format=%T"],
        capture_output=True,
        text=True,
        env={**os.environ, "SLURM_CONF": conf},
    )
    return out.stdout.strip() if out.returncode == 0 else ""


def up(
    root: str | Path | None = None,
    *,
    partition: str = "debug",
    cpus: int | None = None,
    memory_mb: int | None = None,
    cred_expire_s: int = 5,
    timeout_s: float = 60.0,
) -> LocalCluster:
    """Start munged, slurmctld and slurmd with a fresh configuration under ``root`` and wait until the
    node is idle. On any failure the daemons already started are stopped before the error propagates."""
    if os.geteuid() != 0:
        raise PermissionError("a local SLURM cluster needs root (slurmd runs jobs as their user)")
    missing = missing_binaries()
    if missing:
        raise FileNotFoundError(f"missing {', '.join(missing)}; install the packages: {' '.join(PACKAGES)}")
    root_path = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="opd-slurm-"))
    root_path = root_path.resolve()
    if (root_path / STATE_FILE).exists():
        raise FileExistsError(f"{root_path} already holds a cluster; run `down` first")
    if len(str(root_path / "munge" / "munge.socket")) > _MAX_SOCKET_PATH:
        raise ValueError(f"{root_path} is too long a path for the munge socket; choose a shorter --dir")
    for parent in root_path.parents:
        # munged requires every directory above its socket to be enterable by all users.
        if parent.exists() and not parent.stat().st_mode & 0o001:
            raise PermissionError(
                f"{parent} is not searchable by others (o+x); munged refuses a socket below it"
            )
    for sub in ("munge", "state", "spool", "log", "run"):
        (root_path / sub).mkdir(parents=True, exist_ok=True)
    # munged refuses a key or socket directory that others can write to, and a socket directory that
    # others cannot enter (clients of every user connect to it); the key itself is mode 0400.
    os.chmod(root_path, 0o755)
    os.chmod(root_path / "munge", 0o755)

    node = socket.gethostname().split(".")[0]
    ctld_port, slurmd_port = _free_ports(2)
    conf = root_path / "slurm.conf"
    conf.write_text(
        _slurm_conf(
            root_path,
            node,
            partition,
            cpus or os.cpu_count() or 1,
            memory_mb or max(1024, _memory_mb() - 1024),
            ctld_port,
            slurmd_port,
            cred_expire_s,
        )
    )
    key = root_path / "munge" / "munge.key"
    subprocess.run(["mungekey", "--create", "--keyfile", str(key)], check=True, capture_output=True)
    os.chmod(key, 0o400)

    env = {**os.environ, "SLURM_CONF": str(conf)}
    log = root_path / "log"
    cmds = {
        "munged": [
            "munged",
            "--foreground",
            f"--socket={root_path}/munge/munge.socket",
            f"--key-file={key}",
            f"--pid-file={root_path}/run/munged.pid",
            f"--seed-file={root_path}/munge/munged.seed",
            f"--log-file={log}/munged.log",
        ],
        "slurmctld": ["slurmctld", "-D", "-i", "-f", str(conf)],
        "slurmd": ["slurmd", "-D", "-f", str(conf), "-N", node],
    }
    cluster = LocalCluster(
        root=str(root_path),
        conf=str(conf),
        node=node,
        partition=partition,
        cpus=cpus or os.cpu_count() or 1,
        ctld_port=ctld_port,
        slurmd_port=slurmd_port,
        pids={},
        cmdlines={},
    )
    procs: dict[str, subprocess.Popen] = {}
    try:
        for name in DAEMONS:
            procs[name] = _spawn(cmds[name], log / f"{name}.stdout", env)
            cluster.pids[name] = procs[name].pid
            cluster.cmdlines[name] = cmds[name]
            cluster.save()  # after each start, so `down` can stop whatever did start
            if name == "munged":
                sock = root_path / "munge" / "munge.socket"
                _wait(sock.exists, timeout_s, "the munge socket", procs)
            elif name == "slurmctld":
                _wait(lambda: _try_connect(ctld_port), timeout_s, f"slurmctld on port {ctld_port}", procs)
        _wait(lambda: _node_state(str(conf)) == "idle", timeout_s, f"node {node} to become idle", procs)
    except BaseException:
        print(_log_tails(root_path), file=sys.stderr)
        down(root_path)
        raise
    return cluster


def _try_connect(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _log_tails(root: Path, lines: int = 20) -> str:
    parts = []
    for f in sorted((root / "log").glob("*")):
        text = f.read_text(errors="replace").splitlines()[-lines:]
        parts.append(f"--- {f.name} ---\n" + "\n".join(text))
    return "\n".join(parts)


def _same_process(pid: int, cmd: list[str]) -> bool:
    """True when ``pid`` is still the daemon we started (pids are reused after a process exits)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return raw.rstrip(b"\0").split(b"\0") == [c.encode() for c in cmd]


def _cancel_jobs(conf: str, timeout_s: float) -> None:
    env = {**os.environ, "SLURM_CONF": conf}
    subprocess.run(["scancel", "--full", "--user", "root"], env=env, capture_output=True, timeout=30)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = subprocess.run(["squeue", "--noheader"], env=env, capture_output=True, text=True, timeout=30)
        if out.returncode != 0 or not out.stdout.strip():
            return
        time.sleep(0.5)


def down(root: str | Path, *, cancel_timeout_s: float = 40.0, remove: bool = False) -> None:
    """Cancel the cluster's jobs, stop exactly the daemons ``up`` started, optionally delete ``root``."""
    root_path = Path(root).resolve()
    try:
        cluster = LocalCluster.load(root_path)
    except FileNotFoundError:
        return
    alive = {n: p for n, p in cluster.pids.items() if _same_process(p, cluster.cmdlines[n])}
    if "slurmctld" in alive and "slurmd" in alive:
        # Stopping the daemons below matters more than a clean job cancel.
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            _cancel_jobs(cluster.conf, cancel_timeout_s)
    kill_job_processes(cluster.conf)
    # slurmd first (it runs the job steps), munged last (the others authenticate through it).
    for name in ("slurmd", "slurmctld", "munged"):
        pid = alive.get(name)
        if pid is None:
            continue
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while _same_process(pid, cluster.cmdlines[name]) and time.monotonic() < deadline:
            _reap(pid)
            time.sleep(0.1)
        if _same_process(pid, cluster.cmdlines[name]):
            os.kill(pid, signal.SIGKILL)
        _reap(pid)
    Path(root_path, STATE_FILE).unlink(missing_ok=True)
    if remove:
        shutil.rmtree(root_path, ignore_errors=True)


def kill_job_processes(conf: str) -> list[int]:
    """SIGKILL every process that ran as part of a job of this cluster (its environment carries both
    ``SLURM_CONF=<conf>`` and a ``SLURM_JOB_ID``) and is still alive.

    ``proctrack/linuxproc`` tracks a job's processes by parentage: a worker whose launcher died is
    re-parented to init and escapes ``scancel``. Such a worker would keep running, and keep its CPU,
    after its test failed; this finds it by its environment instead.
    """
    marker = f"SLURM_CONF={conf}".encode()
    killed = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in env and any(e.startswith(b"SLURM_JOB_ID=") for e in env):
            with contextlib.suppress(OSError):
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
    return killed


def _reap(pid: int) -> None:
    # When `up` ran in this same process the daemons are our children: collect them so none is a zombie.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up", help="start a one-node cluster and wait until its node is idle")
    p_up.add_argument("--dir", default=None, help="cluster directory (default: a new temporary directory)")
    p_up.add_argument("--partition", default="debug")
    p_up.add_argument("--cpus", type=int, default=None, help="CPUs of the node (default: all)")
    p_up.add_argument("--install", action="store_true", help="apt-get install the packages when missing")
    p_down = sub.add_parser("down", help="cancel jobs and stop the daemons that `up` started")
    p_down.add_argument("--dir", required=True)
    p_down.add_argument("--remove", action="store_true", help="also delete the cluster directory")
    sub.add_parser("install", help=f"apt-get install {' '.join(PACKAGES)}")
    args = parser.parse_args(argv)

    if args.cmd == "install":
        install_packages()
        return 0
    if args.cmd == "up":
        if args.install and missing_binaries():
            install_packages()
        cluster = up(args.dir, partition=args.partition, cpus=args.cpus)
        print(
            f"# node {cluster.node} idle; stop with: {sys.argv[0]} down --dir {cluster.root}", file=sys.stderr
        )
        print(f"export SLURM_CONF={cluster.conf}")
        return 0
    down(args.dir, remove=args.remove)
    return 0


if __name__ == "__main__":
    sys.exit(main())
