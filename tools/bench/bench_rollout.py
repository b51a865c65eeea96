"""Rollout throughput: the KV-cache sampler against the no-cache recompute decoder, same model and prompts.

For each model size, one randomly initialised Megatron GPTModel (TP=1, one process) decodes the same batch
of mixed-length prompts three ways:

* ``recompute``: :func:`opd_megatron.rollout.greedy.greedy_generate`, which runs the whole sequence through
  the model at every step (the baseline);
* ``kv greedy``: :class:`~opd_megatron.rollout.sampler.MegatronSampler` at temperature 0, which must give
  the same tokens (checked);
* ``kv sample``: the same sampler at temperature 1 with top-p 0.95 (the sampling path);
* ``megatron greedy`` / ``megatron sample``: the same two with ``lean_decode=False``, i.e. every decode
  step through Megatron-core's own modules instead of the lean decode path
  (:mod:`opd_megatron.rollout.lean_decode`); both must give identical rollouts (checked).

With ``--compare-to REV`` the KV-cache sampler of git revision ``REV`` (its ``rollout/sampler.py``, on
today's other modules) also runs, interleaved with today's (A, B, A, B, ...), so "before" and "after"
are measured side by side in one run; both must give the same tokens and log-probabilities.

Throughput is ``batch * decode steps / seconds``: rows that finish early still occupy the batch in all three
methods, so the steps executed, not the tokens kept, are the work done. Each method runs once to warm up,
then ``--repeats`` times; the best time is reported (the least disturbed by other load on the machine).
Times are the process's CPU time (user + system), not wall time: on a shared machine wall time also
counts the time a ready process waits for a core. Run with ``OMP_NUM_THREADS=1`` so the two agree on an
idle machine.

    python tools/bench/bench_rollout.py [--sizes 128x2,256x4] [--batch 32] [--new-tokens 32] \
        [--out bench_results/rollout.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path


def _parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"128x2,256x4"`` -> ``[(hidden 128, 2 layers), (hidden 256, 4 layers)]``."""
    sizes = []
    for item in text.split(","):
        hidden, layers = item.lower().split("x")
        sizes.append((int(hidden), int(layers)))
    return sizes


def _best_time(fn, repeats: int):
    """Run ``fn`` once to warm up, then ``repeats`` times; (best seconds, last result)."""
    result = fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        result = fn()
        best = min(best, time.process_time() - t0)
    return best, result


def _sampler_at(rev: str):
    """``MegatronSampler`` as of git revision ``rev`` (only ``rollout/sampler.py`` is taken from it)."""
    import importlib.util
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    src = subprocess.run(
        ["git", "-C", str(repo), "show", f"{rev}:opd_megatron/rollout/sampler.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    name = f"_sampler_at_{rev.replace('/', '_').replace('~', '_').replace('^', '_')}"
    spec = importlib.util.spec_from_loader(name, loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    exec(compile(src, f"{rev}:opd_megatron/rollout/sampler.py", "exec"), module.__dict__)
    return module.MegatronSampler


def _interleaved(fns: dict, repeats: int) -> dict:
    """Best time of each function over ``repeats`` interleaved rounds, after one warm-up each."""
    results = {k: f() for k, f in fns.items()}
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.process_time()
            results[k] = f()
            best[k] = min(best[k], time.process_time() - t0)
    return {k: (best[k], results[k]) for k in fns}


def bench_size(groups, hidden: int, layers: int, args) -> dict:
    import torch

    from opd_megatron.config import ModelConfig
    from opd_megatron.models.gpt import build_gpt_model, num_parameters
    from opd_megatron.rollout.greedy import greedy_generate
    from opd_megatron.rollout.sampler import MegatronSampler, SamplingParams

    heads = max(4, hidden // 64)
    cfg = ModelConfig(
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=heads // 2,
        max_sequence_length=args.max_prompt + args.new_tokens,
    )
    model = build_gpt_model(cfg, groups, args.vocab, seed=0).eval()
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(args.min_prompt, args.max_prompt + 1, (args.batch,), generator=g).tolist()
    prompts = [torch.randint(4, args.vocab, (n,), generator=g).tolist() for n in lengths]
    eos, pad = 2, 0
    sampler = MegatronSampler(model, groups, eos_id=eos, pad_id=pad, max_batch_size=args.batch)

    t_rec, ref = _best_time(
        lambda: greedy_generate(model, prompts, args.new_tokens, eos, pad, groups), args.repeats
    )
    greedy = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0)
    sample = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, top_p=0.95, seed=0)
    megatron = MegatronSampler(
        model, groups, eos_id=eos, pad_id=pad, max_batch_size=args.batch, lean_decode=False
    )
    fns = {
        "kv_greedy": lambda: sampler.generate(prompts, greedy),
        "kv_sample": lambda: sampler.generate(prompts, sample),
        "megatron_greedy": lambda: megatron.generate(prompts, greedy),
        "megatron_sample": lambda: megatron.generate(prompts, sample),
    }
    if args.compare_to:
        before = _sampler_at(args.compare_to)(
            model, groups, eos_id=eos, pad_id=pad, max_batch_size=args.batch
        )
        fns["before_greedy"] = lambda: before.generate(prompts, greedy)
        fns["before_sample"] = lambda: before.generate(prompts, sample)
    timed = _interleaved(fns, args.repeats)
    (t_kv, ro), (t_sample, ro_s) = timed["kv_greedy"], timed["kv_sample"]
    kv_tokens = [c[:-1] if c and c[-1] == eos else c for c in ro.completion_ids]
    same = kv_tokens == ref
    # Every method runs until its longest row stops (greedy_generate drops the EOS it stopped on).
    steps = max(len(c) for c in ro.completion_ids)
    steps_sample = max(len(c) for c in ro_s.completion_ids)
    return {
        "hidden": hidden,
        "layers": layers,
        "params": num_parameters(model),
        "batch": args.batch,
        "new_tokens": args.new_tokens,
        "prompt_lengths": [min(lengths), max(lengths)],
        "decode_steps": steps,
        "greedy_tokens_equal": same,
        "recompute_s": t_rec,
        "kv_greedy_s": t_kv,
        "kv_sample_s": t_sample,
        "recompute_tok_s": args.batch * steps / t_rec,
        "kv_greedy_tok_s": args.batch * steps / t_kv,
        "kv_sample_tok_s": args.batch * steps_sample / t_sample,
        "speedup_greedy": t_rec / t_kv,
        "megatron_greedy_tok_s": args.batch * steps / timed["megatron_greedy"][0],
        "megatron_sample_tok_s": args.batch * steps_sample / timed["megatron_sample"][0],
        "lean_over_megatron_greedy": timed["megatron_greedy"][0] / t_kv,
        "lean_over_megatron_sample": timed["megatron_sample"][0] / t_sample,
        **_lean_check(ro, ro_s, timed["megatron_greedy"][1], timed["megatron_sample"][1]),
        **_before(timed, ro, ro_s, args),
    }


def _lean_check(ro, ro_s, mg, mg_s) -> dict:
    """Lean decode vs Megatron's forward: the same tokens, and the largest log-prob difference."""
    pairs = ((ro, mg), (ro_s, mg_s))
    diffs = [abs(x - y) for a, b in pairs for la, lb in zip(a.logprobs, b.logprobs) for x, y in zip(la, lb)]
    return {
        "lean_same_tokens": all(a.completion_ids == b.completion_ids for a, b in pairs),
        "lean_max_logprob_diff": max(diffs, default=0.0),
    }


def _before(timed: dict, ro, ro_s, args) -> dict:
    """Tokens/s of the ``--compare-to`` revision and whether its rollouts are identical to today's."""
    if "before_greedy" not in timed:
        return {}
    (t_bg, rb), (t_bs, rbs) = timed["before_greedy"], timed["before_sample"]
    steps = max(len(c) for c in rb.completion_ids)
    steps_s = max(len(c) for c in rbs.completion_ids)
    same = all(a == b for a, b in ((ro, rb), (ro_s, rbs)))
    return {
        "compare_to": args.compare_to,
        "before_greedy_tok_s": args.batch * steps / t_bg,
        "before_sample_tok_s": args.batch * steps_s / t_bs,
        "before_identical": same,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="128x2,128x4,256x2,256x4", help="HIDDENxLAYERS, comma separated")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--min-prompt", type=int, default=8)
    parser.add_argument("--max-prompt", type=int, default=24)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="bench_results/rollout.json")
    parser.add_argument(
        "--compare-to", default="", help="git revision whose sampler runs interleaved (before)"
    )
    args = parser.parse_args()

    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    import torch

    from opd_megatron.config import ParallelConfig
    from opd_megatron.distributed import destroy_distributed, init_distributed

    groups = init_distributed(ParallelConfig())
    rows = []
    try:
        for hidden, layers in _parse_sizes(args.sizes):
            rows.append(bench_size(groups, hidden, layers, args))
            r = rows[-1]
            print(f"  done hidden={hidden} layers={layers}: speedup {r['speedup_greedy']:.2f}x", flush=True)
    finally:
        destroy_distributed()

    header = (
        f"{'hidden':>6} {'layers':>6} {'params':>9} {'steps':>5} {'recompute tok/s':>15} "
        f"{'kv greedy tok/s':>15} {'kv sample tok/s':>15} {'kv/recompute':>12} {'same tokens':>11}"
    )
    print(
        f"\nbatch {args.batch}, {args.new_tokens} new tokens, prompts {args.min_prompt}-{args.max_prompt} tokens,"
    )
    print(f"vocab {args.vocab}, device {groups.device}, torch threads {torch.get_num_threads()}\n")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['hidden']:>6} {r['layers']:>6} {r['params']:>9} {r['decode_steps']:>5} "
            f"{r['recompute_tok_s']:>15.0f} {r['kv_greedy_tok_s']:>15.0f} {r['kv_sample_tok_s']:>15.0f} "
            f"{r['speedup_greedy']:>11.2f}x {str(r['greedy_tokens_equal']):>11}"
        )
        print(
            f"{'':>6} {'lean':>6} decode path vs Megatron's forward: greedy "
            f"{r['lean_over_megatron_greedy']:.2f}x, sample {r['lean_over_megatron_sample']:.2f}x "
            f"(Megatron: {r['megatron_greedy_tok_s']:.0f} / {r['megatron_sample_tok_s']:.0f} tok/s); same tokens: "
            f"{r['lean_same_tokens']}, max log-prob difference {r['lean_max_logprob_diff']:.1e}"
        )
        if "compare_to" in r:
            print(
                f"{'':>6} {'before':>6} ({r['compare_to']}): kv greedy {r['before_greedy_tok_s']:.0f} tok/s "
                f"(now {r['kv_greedy_tok_s'] / r['before_greedy_tok_s']:.2f}x), kv sample "
                f"{r['before_sample_tok_s']:.0f} tok/s (now {r['kv_sample_tok_s'] / r['before_sample_tok_s']:.2f}x), "
                f"identical rollouts: {r['before_identical']}"
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": str(groups.device),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": os.getloadavg()[0],
        "repeats": args.repeats,
        "timing": "best of repeats after one warm-up run",
    }
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
