"""Benchmark of the fused linear vocab-parallel divergence against the naive loss, Liger and the floor.

    python tools/bench/bench_fused_kl.py [--quick] --out bench_results/fused_kl.json

Variants, each a forward + backward of a distillation loss of the student's lm-head (student hidden
``[T, H]`` and weight ``[V, H]`` get gradients; the teacher's hidden states and weight do not), fp32 on CPU:

- ``naive``:  full student and teacher logits ``[T, V]``, log-softmax, ``F.kl_div`` terms, autograd.
- ``fused``:  ``fused_linear_divergence`` at TP=1 with its default settings (gradients formed during
  forward, softmax and divergence work in cache-sized row blocks; at V >= 16384 each block's
  elementwise work is one ``torch.compile``-d function, compiled in the warm-up iteration).
- ``fused_eager``: the same with ``compile=False`` (every block's elementwise work eager).
- ``liger``:  Liger's ``LigerFusedLinearJSDLoss``, compiled (JSD only; hard-loss weight 0, its default chunk).
- ``fused_tp2``: ``fused_linear_divergence`` at TP=2: two gloo processes, each with half the vocabulary.
- ``floor``:  the bare matmuls, chunked with the same chunk size: student logits, teacher logits, and the
  two backward matmuls of the student lm-head (``grad_h``, ``grad_W``); no softmax, no divergence.

Method. Every variant runs in a fresh subprocess with ``--threads`` intra-op threads (each TP=2 rank gets
the same number, so TP=2 uses twice the cores). It builds the inputs, runs one untimed warm-up iteration
(which also compiles Liger), then ``--iters`` timed iterations, each timed by the wall clock and by the
process's CPU time (user + system); the reported times are the fastest iteration's. The targets are
judged on CPU time: on a shared machine wall time also counts the time a ready process waits for a
core, CPU time does not (with one thread per process the two agree on an idle machine).

Peak extra memory is measured in a second subprocess of the variant, in one iteration after the
warm-up: the peak resident set size during it minus the resident set size just before it, when the
inputs are allocated and the previous gradients freed (a thread samples ``/proc/self/statm`` every
millisecond). So that freed memory really leaves the process (and a later peak is not hidden inside
memory glibc kept from an earlier one), that subprocess runs with ``MALLOC_MMAP_THRESHOLD_=65536`` and
``MALLOC_TRIM_THRESHOLD_=0``. The timed subprocess runs with glibc's default allocator settings, as a
training process does: under the mmap settings every allocation above 64 KiB is a fresh mapping whose
pages fault in, which taxes code that allocates per call (the compiled row block's 1 MiB temporaries
per call) far more than a training process would see (``--timing-malloc mmap`` times under them
instead). For TP=2 the time and memory are the maximum over the two ranks.

The loss of every variant is printed next to the naive one (a sanity check that they compute the same
thing). Results go to a table on stdout and to the JSON file given by ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

SHAPES_FULL = [(4096, 512, 32768), (2048, 1024, 131072)]
SHAPES_QUICK = [(512, 128, 4096)]
VARIANTS = ("naive", "fused", "fused_eager", "liger", "fused_tp2", "floor")
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


# ----------------------------------------------------------------------------------------------------
# Worker side: one variant in this process
# ----------------------------------------------------------------------------------------------------


class _PeakRSS:
    """Samples the resident set size in a background thread (PyTorch ops release the GIL)."""

    def __init__(self, period_s: float = 1e-3):
        self.period_s, self.peak, self._stop = period_s, 0, threading.Event()
        self._fd = os.open("/proc/self/statm", os.O_RDONLY)
        self._page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        return int(os.pread(self._fd, 128, 0).split()[1]) * self._page

    def __enter__(self):
        self.start = self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.period_s)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())
        os.close(self._fd)


def _make_inputs(T: int, H: int, V: int, rank: int, world: int):
    import torch

    g = torch.Generator().manual_seed(1234)
    hidden = torch.randn(T, H, generator=g)
    t_hidden = torch.randn(T, H, generator=g)
    shard = slice(rank * V // world, (rank + 1) * V // world)
    # Generate the full weights in row blocks so a TP rank never holds more than its shard plus a block.
    weight, t_weight = [], []
    for v0 in range(0, V, 8192):
        w = torch.randn(min(8192, V - v0), H, generator=g) / H**0.5
        tw = torch.randn(min(8192, V - v0), H, generator=g) / H**0.5 * 2
        lo, hi = max(v0, shard.start), min(v0 + w.shape[0], shard.stop)
        if lo < hi:
            weight.append(w[lo - v0 : hi - v0].clone())
            t_weight.append(tw[lo - v0 : hi - v0].clone())
    return hidden, torch.cat(weight), t_hidden, torch.cat(t_weight)


def _naive_loss(t_logits, logits, name: str, beta: float):
    """What one writes with full logits: log-softmax both sides, then ``F.kl_div`` (the formulation
    of TRL's GKD loss); divergences without a two-line form use the library's reference."""
    import math

    import torch
    import torch.nn.functional as F

    from opd_megatron.losses import divergence_from_logits

    T = logits.shape[0]
    if name not in ("forward_kl", "reverse_kl", "jsd") or (name == "jsd" and beta in (0.0, 1.0)):
        return divergence_from_logits(t_logits, logits, name, jsd_beta=beta)
    s_lp = F.log_softmax(logits, dim=-1)
    t_lp = F.log_softmax(t_logits, dim=-1)
    if name == "forward_kl":
        return F.kl_div(s_lp, t_lp, reduction="sum", log_target=True) / T
    if name == "reverse_kl":
        return F.kl_div(t_lp, s_lp, reduction="sum", log_target=True) / T
    log_m = torch.logaddexp(t_lp + math.log(beta), s_lp + math.log1p(-beta))
    kl_t = F.kl_div(log_m, t_lp, reduction="sum", log_target=True)
    kl_s = F.kl_div(log_m, s_lp, reduction="sum", log_target=True)
    return (beta * kl_t + (1 - beta) * kl_s) / T


def _step_fn(variant: str, args, hidden, weight, t_hidden, t_weight, group):
    """A closure running one forward + backward; returns the loss value."""
    import torch

    from opd_megatron.losses import auto_chunk_size, fused_linear_divergence

    div = dict(divergence=args.divergence, jsd_beta=args.beta)
    chunk = args.chunk or auto_chunk_size(weight.shape[0])

    if variant == "naive":

        def step():
            logits = hidden @ weight.T
            with torch.no_grad():
                t_logits = t_hidden @ t_weight.T
            loss = _naive_loss(t_logits, logits, args.divergence, args.beta)
            loss.backward()
            return loss.item()

    elif variant in ("fused", "fused_eager", "fused_tp2"):

        def step():
            out = fused_linear_divergence(
                hidden,
                weight,
                teacher_hidden_TH=t_hidden,
                teacher_weight_VH=t_weight,
                chunk_size=chunk,
                tp_group=group,
                compile=False if variant == "fused_eager" else None,
                **div,
            )
            out.loss.backward()
            return out.loss.item()

    elif variant == "liger":
        if args.divergence != "jsd":
            raise SystemExit("the Liger baseline is a JSD loss; use --divergence jsd")
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        loss_fn = LigerFusedLinearJSDLoss(
            weight_hard_loss=0.0, weight_soft_loss=1.0, beta=args.beta, compiled=True
        )
        labels = torch.zeros(hidden.shape[0], dtype=torch.long)

        def step():
            loss = loss_fn(hidden, weight, t_hidden, t_weight, labels)
            loss.backward()
            return loss.item()

    elif variant == "floor":
        T, H, V = hidden.shape[0], hidden.shape[1], weight.shape[0]

        def step():
            s_CV = torch.empty(chunk, V)
            t_CV = torch.empty(chunk, V)
            grad_h = torch.empty(T, H)
            grad_w = torch.zeros(V, H)
            with torch.no_grad():
                for c0 in range(0, T, chunk):
                    c1 = min(c0 + chunk, T)
                    s, t = s_CV[: c1 - c0], t_CV[: c1 - c0]
                    torch.matmul(hidden[c0:c1], weight.T, out=s)
                    torch.matmul(t_hidden[c0:c1], t_weight.T, out=t)
                    torch.matmul(s, weight, out=grad_h[c0:c1])  # s stands in for dLoss/dlogits
                    grad_w.addmm_(s.T, hidden[c0:c1])
            hidden.grad, weight.grad = grad_h, grad_w
            return float("nan")

    else:
        raise SystemExit(f"unknown variant {variant!r}")
    return step


def run_worker(args) -> dict:
    import torch

    from opd_megatron.losses import fused_kl

    torch.set_num_threads(args.threads)
    if args.block:
        fused_kl._CACHE_BLOCK = args.block
    group, rank, world = None, 0, 1
    if args.variant == "fused_tp2":
        import torch.distributed as dist

        dist.init_process_group("gloo")
        group, rank, world = dist.group.WORLD, dist.get_rank(), dist.get_world_size()
    T, H, V = args.shape
    hidden, weight, t_hidden, t_weight = _make_inputs(T, H, V, rank, world)
    hidden.requires_grad_()
    weight.requires_grad_()
    step = _step_fn(args.variant, args, hidden, weight, t_hidden, t_weight, group)

    def run_once():
        hidden.grad = weight.grad = None
        if group is not None:
            torch.distributed.barrier(group)
        t0, c0 = time.perf_counter(), time.process_time()
        loss = step()
        return time.perf_counter() - t0, time.process_time() - c0, loss

    warmup_s, _, loss = run_once()
    if args.phase == "memory":
        # One iteration of its own, so the sampling thread does not count in any time.
        hidden.grad = weight.grad = None
        with _PeakRSS() as peak:
            run_once()
        return dict(rank=rank, peak_extra_bytes=peak.peak - peak.start, loss=loss)
    wall, cpu = [], []
    for _ in range(args.iters):
        dt, dc, loss = run_once()
        wall.append(dt)
        cpu.append(dc)
    return dict(rank=rank, wall_s=wall, cpu_s=cpu, warmup_s=warmup_s, loss=loss)


# ----------------------------------------------------------------------------------------------------
# Driver side: one subprocess per variant (two for TP=2), table, JSON
# ----------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(variant: str, shape, args) -> dict:
    """Times from one run of the variant, peak memory from another (see the module docstring)."""
    timed = _run_workers(variant, shape, args, "time")
    if "error" in timed:
        return timed
    mem = _run_workers(variant, shape, args, "memory")
    if "error" in mem:
        return mem
    return dict(
        time_s=max(min(r["cpu_s"]) for r in timed["ranks"]),
        wall_s=max(min(r["wall_s"]) for r in timed["ranks"]),
        runs=[dict(wall_s=r["wall_s"], cpu_s=r["cpu_s"]) for r in timed["ranks"]],
        warmup_s=max(r["warmup_s"] for r in timed["ranks"]),
        peak_extra_bytes=max(r["peak_extra_bytes"] for r in mem["ranks"]),
        loss=timed["ranks"][0]["loss"],
    )


def _run_workers(variant: str, shape, args, phase: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--phase", phase, "--shape", *map(str, shape)]
    cmd += ["--threads", str(args.threads), "--iters", str(args.iters), "--divergence", args.divergence]
    cmd += ["--beta", str(args.beta)] + (["--chunk", str(args.chunk)] if args.chunk else [])
    cmd += ["--block", str(args.block)] if args.block else []
    malloc = MALLOC_ENV if phase == "memory" or args.timing_malloc == "mmap" else {}
    env = {**os.environ, **malloc, "OMP_NUM_THREADS": str(args.threads)}
    repo = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    world = 2 if variant == "fused_tp2" else 1
    port = _free_port()
    procs = []
    for rank in range(world):
        rank_env = dict(
            env, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world)
        )
        procs.append(
            subprocess.Popen(cmd, env=rank_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    results = []
    for p in procs:
        out, err = p.communicate(timeout=args.timeout)
        if p.returncode != 0:
            return {"error": err.strip().splitlines()[-1] if err.strip() else f"exit code {p.returncode}"}
        results.append(json.loads(out.strip().splitlines()[-1]))
    return dict(ranks=results)


def _targets(rows: dict) -> list[dict]:
    """The targets for ours: time <= 1.10x the floor (CPU and wall time), peak extra memory <= Liger's
    and <= 25% of naive, time <= Liger's (JSD)."""
    out = []
    naive, liger, floor = (rows.get(k) or {} for k in ("naive", "liger", "floor"))

    def ok(*rs):
        return all(r and "error" not in r for r in rs)

    for name in ("fused", "fused_eager"):
        ours = rows.get(name) or {}
        if ok(ours, floor):
            for key, what in (("time_s", "cpu"), ("wall_s", "wall")):
                out.append(
                    dict(
                        target=f"{name}: {what} time <= 1.10x floor", value=ours[key] / floor[key], limit=1.10
                    )
                )
        if ok(ours, liger):
            mem = ours["peak_extra_bytes"] / max(liger["peak_extra_bytes"], 1)
            out.append(dict(target=f"{name}: peak extra memory <= liger's", value=mem, limit=1.0))
            out.append(
                dict(target=f"{name}: cpu time <= liger's", value=ours["time_s"] / liger["time_s"], limit=1.0)
            )
        if ok(ours, naive):
            mem = ours["peak_extra_bytes"] / max(naive["peak_extra_bytes"], 1)
            out.append(dict(target=f"{name}: peak extra memory <= 25% of naive", value=mem, limit=0.25))
    for t in out:
        t["met"] = t["value"] <= t["limit"]
    return out


def _print_shape(shape, rows: dict, targets: list[dict]) -> None:
    T, H, V = shape
    naive, floor = rows.get("naive") or {}, rows.get("floor") or {}
    print(f"\nT={T} H={H} V={V} (times: fastest iteration; cpu = user + system time of the process)")
    head = (
        f"{'variant':<15} {'cpu s':>7} {'wall s':>7} {'x floor':>8} {'wall x fl':>9} {'x naive':>8} "
        f"{'peak MiB':>9} {'x naive':>8} {'loss':>10}"
    )
    print(head)
    print("-" * len(head))
    for name in VARIANTS:
        r = rows.get(name)
        if r is None:
            continue
        if "error" in r:
            print(f"{name:<15} error: {r['error']}")
            continue
        xf = r["time_s"] / floor["time_s"] if floor.get("time_s") else float("nan")
        xfw = r["wall_s"] / floor["wall_s"] if floor.get("wall_s") else float("nan")
        xn = r["time_s"] / naive["time_s"] if naive.get("time_s") else float("nan")
        mem = r["peak_extra_bytes"] / 2**20
        xm = (
            r["peak_extra_bytes"] / naive["peak_extra_bytes"]
            if naive.get("peak_extra_bytes")
            else float("nan")
        )
        print(
            f"{name:<15} {r['time_s']:>7.2f} {r['wall_s']:>7.2f} {xf:>8.2f} {xfw:>9.2f} {xn:>8.2f} "
            f"{mem:>9.0f} {xm:>8.2f} {r['loss']:>10.6f}"
        )
    for t in targets:
        verdict = "met" if t["met"] else f"MISSED by {t['value'] / t['limit'] - 1:.0%}"
        print(f"  {t['target']}: {t['value']:.2f} (limit {t['limit']}) -> {verdict}")


def _summary(rounds: list[dict]) -> dict:
    """Per variant: its wall and CPU time over the same round's floor, median and range over rounds."""
    out = {}
    for name in rounds[0]["variants"]:
        ratios = {"wall_s": [], "time_s": []}
        for r in rounds:
            mine, floor = r["variants"].get(name) or {}, r["variants"].get("floor") or {}
            if "error" in mine or "error" in floor or not floor:
                continue
            for key in ratios:
                ratios[key].append(mine[key] / floor[key])
        if ratios["wall_s"]:
            out[name] = {
                f"{key}_x_floor": dict(median=statistics.median(v), min=min(v), max=max(v), rounds=v)
                for key, v in ratios.items()
            }
    return out


def _print_summary(summary: dict) -> None:
    print("\nx floor over rounds (median, range; each round against its own floor run):")
    for name, s in summary.items():
        w, c = s["wall_s_x_floor"], s["time_s_x_floor"]
        print(
            f"  {name:<15} wall {w['median']:.3f} ({w['min']:.3f}-{w['max']:.3f})   "
            f"cpu {c['median']:.3f} ({c['min']:.3f}-{c['max']:.3f})"
        )


def _run_shape(shape, args) -> dict:
    """Every variant at one shape, ``args.rounds`` times; the result entry of the JSON report."""
    rounds = []
    for k in range(args.rounds):
        # the order of the variants rotates between rounds, so a drift of the machine's speed
        # does not always favour the same one
        order = args.variants[k % len(args.variants) :] + args.variants[: k % len(args.variants)]
        rows = {}
        for variant in order:
            print(f"round {k + 1}: running {variant} at T,H,V={shape} ...", file=sys.stderr, flush=True)
            rows[variant] = _launch(variant, shape, args)
        targets = _targets(rows)
        _print_shape(shape, rows, targets)
        rounds.append(dict(order=order, variants=rows, targets=targets))
    summary = _summary(rounds)
    if args.rounds > 1:
        _print_summary(summary)
    return dict(
        T=shape[0], H=shape[1], V=shape[2], variants=rounds[0]["variants"], targets=rounds[0]["targets"],
        rounds=rounds, summary=summary,
    )  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one small shape, to check the script works")
    p.add_argument("--out", default="bench_results/fused_kl.json")
    p.add_argument("--shapes", nargs="+", default=None, help="T,H,V triples, e.g. 4096,512,32768")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    p.add_argument("--iters", type=int, default=2, help="timed iterations after one warm-up")
    p.add_argument(
        "--rounds", type=int, default=1, help="runs of every variant, in rotating order; medians over rounds"
    )
    p.add_argument("--divergence", default="jsd")
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--chunk", type=int, default=0, help="tokens per chunk for ours and the floor (0: auto)")
    p.add_argument(
        "--block", type=int, default=0, help="elements per CPU row-block work buffer of ours (0: the default)"
    )
    p.add_argument(
        "--timing-malloc",
        choices=("default", "mmap"),
        default="default",
        help="allocator settings of the timed runs: glibc's defaults, or the memory run's mmap settings",
    )
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--phase", choices=("time", "memory"), default="time", help=argparse.SUPPRESS)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--shape", nargs=3, type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        args.variant = args.worker
        print(json.dumps(run_worker(args)))
        return 0

    if args.shapes:
        shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes]
    else:
        shapes = SHAPES_QUICK if args.quick else SHAPES_FULL
    report = dict(
        settings=dict(
            threads=args.threads, iters=args.iters, divergence=args.divergence, beta=args.beta, chunk=args.chunk,
            block=args.block, timing_malloc=args.timing_malloc, rounds=args.rounds,
            dtype="float32", device="cpu", machine=platform.machine(), cpus=os.cpu_count(),
        ),
        results=[],
    )  # fmt: skip
    for shape in shapes:
        report["results"].append(_run_shape(shape, args))
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
