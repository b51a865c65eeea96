"""Peak memory per rank and step time of the OPD update, torch optimizer path vs Megatron DDP paths, DP=2.

    python tools/bench/bench_optimizer_paths.py [--quick] [--steps 3] --out bench_results/optim.json

The measured step is the update half of an OPD step as ``train/opd.py`` runs it: the student's forward
and backward through Megatron's schedule with the dense reverse-KL objective (fused linear divergence
against a co-located teacher's hidden states and output layer, :class:`~opd_megatron.targets.TeacherTargets`),
then the optimizer step. Rollout and teacher scoring are the same on every path and left out. Variants:

- ``torch``: AdamW on the parameters, one flat DP all-reduce (the old path);
- ``megatron``: Megatron-core DDP + optimizer, replicated state;
- ``megatron_distopt``: the same with the distributed optimizer (state sharded over the 2 DP ranks).

Each variant runs in two fresh gloo processes (DP=2), one thread each, with one untimed warm-up step and
then ``--steps`` timed steps (the fastest counts; CPU time per rank, then the max over ranks). Peak
memory per rank is the process's peak resident set size (``ru_maxrss``) at the end, max over ranks: it
includes the model, the teacher tensors and the interpreter, identical across variants, so differences
between variants are the optimizer's and the gradient buffers'. Full size: 6 layers, hidden 384,
vocabulary 32768, 8 rollouts of 96 tokens per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

FULL = dict(layers=6, hidden=384, heads=6, vocab=32768, rows=8, seq=96)
QUICK = dict(layers=2, hidden=64, heads=2, vocab=2048, rows=4, seq=32)
VARIANTS = {
    "torch": dict(optimizer_impl="torch"),
    "megatron": dict(optimizer_impl="megatron"),
    "megatron_distopt": dict(optimizer_impl="megatron", use_distributed_optimizer=True),
}


def _worker(rank: int, port: int, shape: dict, variant: str, steps: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    from opd_megatron.config import LossConfig, ModelConfig, ParallelConfig, TrainConfig
    from opd_megatron.distributed import init_distributed
    from opd_megatron.models.gpt import build_gpt_model, output_weight
    from opd_megatron.targets import TeacherTargets
    from opd_megatron.train.batch import MicroBatch
    from opd_megatron.train.objectives import METRIC_KEYS, Objectives
    from opd_megatron.train.optim import make_optimizer
    from opd_megatron.train.step import forward_backward, student_hidden

    g = init_distributed(ParallelConfig(), seed=0)
    mcfg = ModelConfig(
        num_layers=shape["layers"], hidden_size=shape["hidden"], num_attention_heads=shape["heads"],
        vocab_size=shape["vocab"], max_sequence_length=shape["seq"],
    )  # fmt: skip
    model = build_gpt_model(mcfg, g, seed=0)
    opt = make_optimizer(model, TrainConfig(lr=1e-4, warmup_steps=0, **VARIANTS[variant]), g)
    gen = torch.Generator().manual_seed(rank)
    b, s, h, v = shape["rows"], shape["seq"], shape["hidden"], model.padded_vocab_size
    tokens_BS = torch.randint(0, shape["vocab"], (b, s), generator=gen)
    mask_BS = torch.zeros(b, s)
    mask_BS[:, s // 4 :] = 1.0  # the completion: three quarters of each row
    n = int(mask_BS.sum())
    target = TeacherTargets(torch.randn(n, h, generator=gen), 0.02 * torch.randn(v, h, generator=gen))
    mb = MicroBatch(tokens_BS, torch.roll(tokens_BS, -1, 1), mask_BS, torch.zeros(b, s), torch.ones(b, s))
    mb.target = target
    objectives = Objectives(LossConfig(), None, shape["vocab"])

    def loss_fn(hidden_SBH, mb):
        return objectives.loss(hidden_SBH.transpose(0, 1)[mb.loss_positions], output_weight(model), mb)

    times = []
    for i in range(steps + 1):
        t_cpu = time.process_time()
        loss, _ = forward_backward(model, [mb], student_hidden, loss_fn, g, 2 * n, METRIC_KEYS)
        opt.step(loss, 1.0)
        if i:  # the first step warms up (allocations, optimizer state)
            times.append(time.process_time() - t_cpu)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put((rank, min(times), peak_mb, loss))
    torch.distributed.destroy_process_group()


def run_variant(shape: dict, variant: str, steps: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [ctx.Process(target=_worker, args=(r, port, shape, variant, steps, queue)) for r in range(2)]
    for p in procs:
        p.start()
    out = [queue.get(timeout=3600) for _ in procs]
    for p in procs:
        p.join()
    return {
        "step_cpu_s": max(o[1] for o in out),
        "peak_rss_mb_per_rank": max(o[2] for o in out),
        "loss": out[0][3],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (a smoke run)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    shape = QUICK if args.quick else FULL
    results = {name: run_variant(shape, name, args.steps) for name in VARIANTS}
    base = results["torch"]
    print(f"shape {shape}, DP=2, {args.steps} timed steps, one thread per rank")
    print(
        f"{'variant':18s} {'step cpu s':>11s} {'x torch':>8s} {'peak RSS MB/rank':>17s} {'- torch MB':>11s}"
    )
    for name, r in results.items():
        print(
            f"{name:18s} {r['step_cpu_s']:11.3f} {r['step_cpu_s'] / base['step_cpu_s']:8.2f} "
            f"{r['peak_rss_mb_per_rank']:17.0f} {r['peak_rss_mb_per_rank'] - base['peak_rss_mb_per_rank']:11.0f}"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"shape": shape, "steps": args.steps, "results": results}, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    main()
