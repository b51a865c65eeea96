"""Specialise-then-unify with a remote expert and an expert of another tokenizer, end to end on one machine.

1. Reuses (or trains) the demo's experts and student warm start (``runs/specialise_then_unify``).
2. Trains a byte-level BPE (tiktoken ranks) on the domains' text and an expert for ``sorting`` that speaks
   it (cached).
3. Starts ``opd-megatron serve-teacher`` for the addition expert on 127.0.0.1 (a free port).
4. Runs ``remote_and_cross_tokenizer.yaml`` against it and prints: per-domain exact match before/after,
   rollouts and scoring throughput per teacher, the cross-tokeniser alignment rates per content class,
   and the share of a step spent in rollout, scoring and update.

    python examples/specialise_then_unify/run_remote_cross.py [--steps 400] [--prepare-only]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "remote_and_cross_tokenizer.yaml"


def prepare(root: str) -> dict[str, str]:
    from opd_megatron.config import TokenizerConfig
    from opd_megatron.data.domains import build_datasets
    from opd_megatron.recipes.mopd_demo import (
        DOMAINS,
        cached_sft,
        data_config,
        expert_config,
        student_warmup_config,
    )
    from opd_megatron.tokenization import load_tokenizer
    from opd_megatron.tokenization.train_local import train_tiktoken

    experts = {d: str(cached_sft(expert_config(root, d))) for d in DOMAINS}
    warm = str(cached_sft(student_warmup_config(root)))
    tok_dir = Path(root) / "bpe_tokenizer"
    if not (tok_dir / "opd_tokenizer.json").is_file():
        rows, _ = build_datasets(data_config(DOMAINS))
        tok = train_tiktoken([r.prompt + (r.reference or "") for r in rows], vocab_size=320)
        tok.save(tok_dir)
    print(f"BPE tokenizer: {load_tokenizer(tok_dir).vocab_size} tokens ({tok_dir})")
    cfg = expert_config(root, "sorting")
    cfg = replace(
        cfg,
        name="sorting-expert-bpe",
        tokenizer=TokenizerConfig(kind="tiktoken", path=str(tok_dir)),
        train=replace(cfg.train, output_dir=f"{root}/experts_bpe/sorting"),
    )
    experts["sorting-bpe"] = str(cached_sft(cfg))
    return {**experts, "warm": warm}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="runs/specialise_then_unify")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--prepare-only", action="store_true")
    args = p.parse_args()
    ckpts = prepare(args.root)
    if args.prepare_only:
        return 0

    from opd_megatron.config import load_config
    from opd_megatron.teachers.process import spawn_teacher_server, stop_teacher_server
    from opd_megatron.train.metrics import read_metrics
    from opd_megatron.train.opd import OPDTrainer
    from opd_megatron.train.report import print_table

    proc, url = spawn_teacher_server(ckpts["addition"], "--name", "addition-expert")
    try:
        cfg = load_config(CONFIG, [f"train.steps={args.steps}"])
        cfg.teachers[0].url = url
        trainer = OPDTrainer(cfg)
        result = trainer.run()
    finally:
        stop_teacher_server(proc)

    rows = [[d, f"{result.eval_before[d]:.2f}", f"{v:.2f}"] for d, v in result.eval_after.items()]
    print_table("Remote + cross-tokeniser MOPD: held-out exact match", ["domain", "before", "after"], rows)
    o = trainer.orch
    print_table(
        "Teachers",
        ["teacher", "kind", "rollouts", "completion tokens", "scoring s", "tokens/s"],
        [
            [n, kind, str(o.rollouts[n]), str(o.tokens[n]), f"{o.score_seconds[n]:.1f}",
             f"{o.tokens[n] / max(o.score_seconds[n], 1e-9):.0f}"]
            for n, kind in zip(o.names, ("remote (top-k)", "co-located (dense)", "co-located, own tokenizer"))
        ],
    )  # fmt: skip
    train = [r for r in read_metrics(Path(cfg.train.output_dir) / "metrics.jsonl", "train") if "loss" in r]

    def mean(key: str) -> float:  # over the steps that logged ``key`` (NaN where a class had no tokens)
        values = [r[key] for r in train if isinstance(r.get(key), float) and r[key] == r[key]]
        return sum(values) / max(len(values), 1)

    classes = ["rate", *sorted(k.split("/", 1)[1] for k in train[0] if k.startswith("align/rate_"))]
    print("alignment (student tokens of the BPE expert's rollouts receiving the KL), mean over steps: "
          + ", ".join(f"{c}: {mean('align/' + c):.3f}" for c in classes))  # fmt: skip
    print(
        "step time shares: "
        + ", ".join(f"{k}: {mean('share_' + k):.2f}" for k in ("rollout", "score", "update"))
        + f"; wall {result.wall_s:.0f}s"
    )
    Path(cfg.train.output_dir, "summary.json").write_text(
        json.dumps({"before": result.eval_before, "after": result.eval_after, "url": url}, indent=1)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
