"""Cross-tokeniser on-policy distillation on the built-in domains, with two locally trained tokenizers.

The teacher speaks a byte-level BPE (tiktoken ranks, digits merged in groups of up to three); the
student a SentencePiece BPE (digits split one by one, byte fallback). Both are trained here on the
domains' text. Steps:

1. train both tokenizers (cached under ``--root``);
2. SFT the teacher (3 layers) with the BPE, and warm-start the student (2 layers) with SentencePiece;
3. distil: the student samples, each rollout is re-tokenised for the teacher, the KL applies where both
   tokenisations end a token at the same byte (on the shared vocabulary), ULD elsewhere.

Prints the student's exact match before/after per domain, the held-out alignment rate per content class
(prose, digits, code, non-ASCII) and the per-step rates logged during training.

    python examples/cross_tokenizer/run.py [--domains sorting] [--steps 300] [--root runs/cross_tokenizer]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="runs/cross_tokenizer")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--domains", nargs="+", default=["sorting"], help="built-in domains (default: sorting)")
    p.add_argument("--teacher-steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=5e-4, help="OPD learning rate")
    p.add_argument("--uld-weight", type=float, default=1.0, help="weight of the ULD fallback (0: KL only)")
    p.add_argument("--cross-kl", choices=("projected", "shared"), default="projected")
    p.add_argument("--divergence", default="reverse_kl")
    args = p.parse_args()
    root = Path(args.root)

    from opd_megatron.config import LossConfig, RolloutConfig, TeacherConfig, TokenizerConfig
    from opd_megatron.data.domains import build_datasets
    from opd_megatron.tokenization import load_tokenizer
    from opd_megatron.tokenization.alignment import align_completion, alignment_stats
    from opd_megatron.tokenization.train_local import train_sentencepiece, train_tiktoken
    from opd_megatron.train.metrics import read_metrics
    from opd_megatron.train.mopd_demo import cached_sft, data_config, expert_model, mopd_config, student_model
    from opd_megatron.train.mopd_demo import student_warmup_config as warm_cfg
    from opd_megatron.train.opd import OPDTrainer
    from opd_megatron.train.report import print_table

    data = data_config(args.domains)
    rows, eval_rows = build_datasets(data)
    corpus = [r.prompt + (r.reference or "") for r in rows]
    toks = {}
    for name, train in (("bpe", lambda: train_tiktoken(corpus, vocab_size=320)),
                        ("spm", lambda: train_sentencepiece(corpus, vocab_size=400))):  # fmt: skip
        d = root / f"{name}_tokenizer"
        if not (d / "opd_tokenizer.json").is_file():
            train().save(d)
        toks[name] = TokenizerConfig(kind="tiktoken" if name == "bpe" else "sentencepiece", path=str(d))
    bpe, spm = load_tokenizer(toks["bpe"]), load_tokenizer(toks["spm"])
    print(
        f"teacher tokenizer: BPE/tiktoken, {bpe.vocab_size} tokens; student: SentencePiece, {spm.vocab_size}"
    )

    base = warm_cfg(str(root))
    teacher_cfg = replace(
        base,
        name="bpe-teacher",
        model=expert_model(),
        tokenizer=toks["bpe"],
        data=data,
        train=replace(base.train, steps=args.teacher_steps, log_every=200, output_dir=str(root / "teacher")),
    )
    student_cfg = replace(
        base,
        name="spm-student-warmup",
        model=student_model(),
        tokenizer=toks["spm"],
        data=data,
        train=replace(base.train, output_dir=str(root / "student_warmup")),
    )
    teacher, warm = str(cached_sft(teacher_cfg)), str(cached_sft(student_cfg))

    teachers = [TeacherConfig(name="bpe-teacher", checkpoint=teacher, tokenizer=toks["bpe"])]
    cfg = mopd_config(str(root), teachers, warm, name="cross_opd")
    cfg = replace(
        cfg,
        data=data,
        tokenizer=toks["spm"],
        loss=LossConfig(
            divergence="reverse_kl", uld_metric="l1", uld_weight=args.uld_weight, cross_kl=args.cross_kl
        ),
        rollout=RolloutConfig(max_new_tokens=8, temperature=1.0),
        train=replace(cfg.train, steps=args.steps, lr=args.lr, min_lr=args.lr / 10),
    )
    trainer = OPDTrainer(cfg)
    result = trainer.run()

    # Alignment of the reference completions, re-tokenised exactly as the loop does, by content class.
    held = [r for rs in eval_rows.values() for r in rs]
    al = alignment_stats(
        [align_completion(spm, spm.encode(r.reference), bpe, bpe.encode(r.reference)) for r in held]
    )
    train = [
        r for r in read_metrics(Path(cfg.train.output_dir) / "metrics.jsonl", "train") if "align/rate" in r
    ]
    during = sum(r["align/rate"] for r in train) / max(len(train), 1)
    print_table(
        "Cross-tokeniser OPD (SentencePiece student, BPE teacher): held-out exact match",
        ["domain", "teacher", "student before", "student after"],
        [
            [d, f"{t:.2f}", f"{result.eval_before[d]:.2f}", f"{result.eval_after[d]:.2f}"]
            for d, t in _teacher_scores(trainer, bpe).items()
        ],
    )
    print(
        "alignment rate of held-out references by content class: "
        + ", ".join(
            f"{k.removeprefix('align/')}: {v:.3f}" for k, v in al.items() if k.startswith("align/rate")
        )
        + f"; mean per-step rate on the student's rollouts during training: {during:.3f}"
    )
    return 0


def _teacher_scores(trainer, bpe):
    from opd_megatron.train.evaluate import exact_match

    t = next(iter(trainer.teachers.values())).inner
    return exact_match(
        t.model, bpe, trainer.eval_rows, t.groups, trainer.max_eval_tokens, trainer.cfg.train.eval_samples
    )


if __name__ == "__main__":
    sys.exit(main())
