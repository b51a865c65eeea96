"""What a checkpoint's manifest costs, as ratios to the save it protects, measured side by side in one run.

Builds a GPT model on CPU (nothing is downloaded), then for ``--repeats`` rounds: a full ``save_checkpoint``
(weights, rank state, meta, manifest, rename), the manifest alone (``build_manifest``: SHA-256 of every
file), a full verification (what a resume does) and a sizes-only verification (what every load does).
Reports medians and the ratios manifest / save and verify / save, with the checkpoint size and the hash
throughput.

    python tools/bench/bench_checkpoint_manifest.py [--hidden 512] [--layers 4] [--vocab 16000]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=16000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args()

    import torch

    from opd_megatron.config import ModelConfig, ParallelConfig, RunConfig
    from opd_megatron.distributed import init_distributed
    from opd_megatron.models.checkpoint import save_checkpoint, verify_checkpoint
    from opd_megatron.models.gpt import build_gpt_model
    from opd_megatron.models.manifest import build_manifest

    torch.set_num_threads(1)
    groups = init_distributed(ParallelConfig())
    heads = max(1, args.hidden // 64)
    cfg = RunConfig(
        model=ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=heads)
    )
    model = build_gpt_model(cfg.model, groups, args.vocab, seed=0)
    times: dict[str, list[float]] = {"save": [], "manifest": [], "verify_full": [], "verify_sizes": []}
    root = Path(tempfile.mkdtemp(prefix="bench_manifest_"))
    try:
        for step in range(args.repeats):
            t0 = time.perf_counter()
            ckpt = save_checkpoint(
                root, step, model, groups, config=cfg, rank_state={"step": step}, job="sft"
            )
            times["save"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            build_manifest(ckpt)
            times["manifest"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            assert verify_checkpoint(ckpt) == []
            times["verify_full"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            assert verify_checkpoint(ckpt, checksums=False) == []
            times["verify_sizes"].append(time.perf_counter() - t0)
        size = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "checkpoint_mib": round(size / 2**20, 1),
        "median_s": {k: round(v, 4) for k, v in med.items()},
        # The manifest is part of the save: its share of the save's time.
        "manifest_share_of_save": round(med["manifest"] / med["save"], 3),
        "verify_full_over_save": round(med["verify_full"] / med["save"], 3),
        "verify_sizes_over_save": round(med["verify_sizes"] / med["save"], 5),
        "sha256_mib_per_s": round(size / 2**20 / med["manifest"], 1),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
