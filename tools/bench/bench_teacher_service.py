"""Teacher scoring throughput: remote (HTTP ``serve-teacher``) against co-located, same checkpoint, same batches.

One randomly initialised Megatron GPTModel is saved as a checkpoint, then the same batches of token
sequences are scored four ways:

* ``colocated hidden``: :class:`~opd_megatron.teachers.MegatronTeacher` (pre-lm-head hidden states for the
  fused dense loss: what a co-located teacher hands the loss);
* ``colocated top-k``: :class:`~opd_megatron.teachers.topk_scoring.TopKScorer` in this process (the
  server's computation without HTTP);
* ``remote top-k``: :class:`~opd_megatron.teachers.RemoteTeacherClient` against ``opd-megatron
  serve-teacher`` in a separate process on 127.0.0.1, one request per batch;
* ``remote top-k xN``: the same batch split across N client threads sent at once, which the server's
  batching worker merges into forward passes again.

Throughput is scored sequence tokens per second (``sum(len(seq))`` over the batches / seconds). Each method
runs once to warm up, then ``--repeats`` times; the best time is reported. The remote results are checked
against the in-process top-k (same ids). On a shared CPU machine both processes compete for the same
cores, so the remote numbers include that contention; on a real deployment the teacher has its own GPU.

    python tools/bench/bench_teacher_service.py [--hidden 256 --layers 4 --vocab 2048] [--batch 16] \\
        [--k 20] [--out bench_results/teacher_service.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import warnings
from pathlib import Path


def _best_time(fn, repeats: int):
    result = fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def _start_server(ckpt: str, args) -> tuple[subprocess.Popen, str]:
    from opd_megatron.teachers.process import spawn_teacher_server

    return spawn_teacher_server(
        ckpt, "--name", "bench", "--max-k", str(args.k), "--max-batch", str(args.batch),
        "--max-body-bytes", str(64 << 20), env={"OMP_NUM_THREADS": str(args.threads)},
    )  # fmt: skip


def _threaded(client, seqs, k, n_threads):
    parts = [seqs[i::n_threads] for i in range(n_threads)]
    out: list = [None] * n_threads

    def one(i):
        out[i] = client.score_topk(parts[i], k)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=16, help="sequences per batch")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--min-len", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument(
        "--prompt-len", type=int, default=16, help="the rest of each sequence is 'completion'"
    )
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--client-threads", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each process")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench_results/teacher_service.json")
    args = parser.parse_args()

    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    import torch

    torch.set_num_threads(args.threads)
    from opd_megatron.config import ModelConfig, ParallelConfig, RunConfig
    from opd_megatron.distributed import init_distributed
    from opd_megatron.models.checkpoint import save_checkpoint
    from opd_megatron.models.gpt import build_gpt_model
    from opd_megatron.teachers import MegatronTeacher, RemoteTeacherClient
    from opd_megatron.teachers.topk_scoring import TopKScorer
    from opd_megatron.train.report import print_table

    groups = init_distributed(ParallelConfig())
    heads = max(1, args.hidden // 64)
    cfg = RunConfig(
        name="bench",
        model=ModelConfig(
            num_layers=args.layers,
            hidden_size=args.hidden,
            num_attention_heads=heads,
            vocab_size=args.vocab,
            max_sequence_length=args.max_len,
        ),
    )
    model = build_gpt_model(cfg.model, groups, seed=0, frozen=True)
    rng = random.Random(0)
    batches = [
        [
            [rng.randrange(4, args.vocab) for _ in range(rng.randint(args.min_len, args.max_len))]
            for _ in range(args.batch)
        ]
        for _ in range(args.batches)
    ]
    n_tokens = sum(len(s) for b in batches for s in b)
    colocated = MegatronTeacher("bench", model, groups, pad_id=0)
    scorer = TopKScorer(model, groups, pad_id=0)

    def run_hidden():
        for b in batches:
            p, c = [s[: args.prompt_len] for s in b], [s[args.prompt_len :] for s in b]
            colocated.score([None] * len(b), p, c)

    def run_topk():
        return [scorer.score(b, args.k) for b in batches]

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = save_checkpoint(tmp, 0, model, groups, config=cfg)
        proc, url = _start_server(str(ckpt), args)
        try:
            client = RemoteTeacherClient(url, "bench", timeout_s=300, retries=0)
            methods = [
                ("colocated hidden", run_hidden),
                ("colocated top-k", run_topk),
                ("remote top-k", lambda: [client.score_topk(b, args.k) for b in batches]),
                (
                    f"remote top-k x{args.client_threads}",
                    lambda: [_threaded(client, b, args.k, args.client_threads) for b in batches],
                ),
            ]
            results = {}
            for name, fn in methods:
                seconds, results[name] = _best_time(fn, args.repeats)
                rows.append({"method": name, "seconds": seconds, "tokens_per_s": n_tokens / seconds})
            # The server's own account: forward passes (fewer than requests when it merged them) and
            # seconds spent in the model; the rest of the remote time is HTTP and JSON.
            with urllib.request.urlopen(f"{url}/health", timeout=30) as r:
                server_stats = json.loads(r.read())["stats"]
        finally:
            from opd_megatron.teachers.process import stop_teacher_server

            stop_teacher_server(proc)
    # Same checkpoint, same batches: the service must return the in-process top-k ids.
    for ref_batch, got_batch in zip(results["colocated top-k"], results["remote top-k"]):
        for ref, got in zip(ref_batch, got_batch):
            assert torch.equal(ref.topk_ids_LK, got.topk_ids_LK), "remote top-k ids differ from in-process"
            torch.testing.assert_close(ref.topk_logprobs_LK, got.topk_logprobs_LK, atol=1e-4, rtol=0)

    base = next(r for r in rows if r["method"] == "colocated top-k")["tokens_per_s"]
    for r in rows:
        r["vs_colocated_topk"] = r["tokens_per_s"] / base
    meta = {
        "model": f"hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}",
        "batches": f"{args.batches} x {args.batch} sequences of {args.min_len}-{args.max_len} tokens",
        "tokens": n_tokens,
        "k": args.k,
        "torch_threads_per_process": args.threads,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "repeats": args.repeats,
        "server_stats": server_stats,
    }
    print_table(
        f"Teacher scoring throughput ({meta['model']}; {meta['batches']}; k={args.k})",
        ["method", "seconds", "tokens/s", "vs colocated top-k"],
        [
            [r["method"], f"{r['seconds']:.3f}", f"{r['tokens_per_s']:.0f}", f"{r['vs_colocated_topk']:.2f}x"]
            for r in rows
        ],
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(json.dumps({"meta": meta, "results": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
