"""Run a function on N local ranks (gloo), with a hard timeout so a hang fails instead of stalling CI.

The function must be defined at module level (it is pickled by name into spawned processes). Each rank
sees torchrun-style environment variables, so library code initialises exactly as under torchrun.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback
from collections.abc import Callable
from typing import Any


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, rank, world_size, port, args, queue):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    try:
        import warnings

        import torch

        # Megatron-core warns at import about optional CUDA packages a CPU run never uses.
        warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")
        torch.set_num_threads(1)
        result = fn(rank, *args)
        # Serialise by value: a tensor put on a multiprocessing queue is shared through the sender's
        # memory, which is gone once this process exits.
        import io

        buf = io.BytesIO()
        torch.save(result, buf)
        queue.put((rank, "ok", buf.getvalue()))
    except BaseException:  # report every failure to the parent, which raises it
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass


def run_ranks(
    fn: Callable[..., Any], world_size: int = 2, timeout: float = 240, args: tuple = ()
) -> list[Any]:
    """Run ``fn(rank, *args)`` on ``world_size`` processes; return the per-rank results in rank order.

    The rendezvous port is picked free and bound later by rank 0, so another process can take it in
    between; that one failure (and only it) is retried on a fresh port."""
    try:
        return _run_once(fn, world_size, timeout, args)
    except RuntimeError as err:
        if "EADDRINUSE" not in str(err):
            raise
        return _run_once(fn, world_size, timeout, args)


def _run_once(fn: Callable[..., Any], world_size: int, timeout: float, args: tuple) -> list[Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_child, args=(fn, r, world_size, port, args, queue)) for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    import queue as queue_mod
    import time

    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"multi-rank run of {fn.__name__} did not finish within {timeout}s")
            try:
                rank, status, payload = queue.get(timeout=min(remaining, 1.0))
            except queue_mod.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead and len(results) + len(errors) < world_size:
                    # A rank died without reporting (segfault, OOM kill).
                    time.sleep(0.5)
                    if queue.empty():
                        raise RuntimeError(f"rank process exited with code {dead[0].exitcode}") from None
                continue
            if status == "ok":
                import io

                import torch

                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors.append(f"rank {rank}:\n{payload}")
        if errors:
            raise RuntimeError("\n".join(errors))
        return [results[r] for r in range(world_size)]
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
