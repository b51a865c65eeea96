"""Cross-tokeniser on-policy distillation on the built-in domains, with two locally trained tokenizers.

One model speaks a byte-level BPE (tiktoken ranks, digits merged in groups of up to three), the other a
SentencePiece BPE (digits split one by one, byte fallback); both are trained here on the domains' text.
By default the student is the BPE model and the teacher the SentencePiece one (``--student spm`` swaps
them). Steps:

1. train both tokenizers (cached under ``--root``);
2. SFT the teacher (3 layers), and warm-start the student (2 layers) by a short SFT;
3. distil: the student samples, each rollout is re-tokenised for the teacher, and the teacher's
   distribution, projected onto the student's next token, is the target of the KL (ULD where it has no
   mass on tokens consistent with the text).

Prints teacher / student before / student after exact match per domain, the alignment rate of the
held-out references per content class (prose, digits, code, non-ASCII) and the mean per-step rate on the
student's own rollouts.

    python examples/cross_tokenizer/run.py [--student bpe|spm] [--domains sorting] [--steps 300]
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
    p.add_argument("--lr", type=float, default=2e-3, help="OPD learning rate")
    p.add_argument("--uld-weight", type=float, default=1.0, help="weight of the ULD fallback (0: KL only)")
    p.add_argument("--cross-kl", choices=("projected", "shared"), default="projected")
    p.add_argument("--divergence", default="reverse_kl")
    p.add_argument("--student", choices=("bpe", "spm"), default="bpe", help="the student's tokenizer")
    p.add_argument("--warmup-steps", type=int, default=60, help="student warm-start SFT steps")
    args = p.parse_args()
    root = Path(args.root)

    from opd_megatron.config import LossConfig, RolloutConfig, TeacherConfig, TokenizerConfig
    from opd_megatron.data.domains import build_datasets
    from opd_megatron.recipes.mopd_demo import (
        cached_sft,
        data_config,
        expert_model,
        mopd_config,
        student_model,
    )
    from opd_megatron.recipes.mopd_demo import student_warmup_config as warm_cfg
    from opd_megatron.tokenization import load_tokenizer
    from opd_megatron.tokenization.alignment import align_completion, alignment_stats
    from opd_megatron.tokenization.train_local import train_sentencepiece, train_tiktoken
    from opd_megatron.train.metrics import read_metrics
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
    s_name, t_name = args.student, "bpe" if args.student == "spm" else "spm"
    s_tok, t_tok = load_tokenizer(toks[s_name]), load_tokenizer(toks[t_name])
    label = {"bpe": "BPE/tiktoken", "spm": "SentencePiece"}
    print(
        f"teacher: {label[t_name]}, {t_tok.vocab_size} tokens; student: {label[s_name]}, {s_tok.vocab_size}"
    )
    run_dir = root / f"{s_name}_student"

    base = warm_cfg(str(root))
    teacher_cfg = replace(
        base,
        name=f"{t_name}-teacher",
        model=expert_model(),
        tokenizer=toks[t_name],
        data=data,
        train=replace(
            base.train, steps=args.teacher_steps, log_every=200, output_dir=str(run_dir / "teacher")
        ),
    )
    student_cfg = replace(
        base,
        name=f"{s_name}-student-warmup",
        model=student_model(),
        tokenizer=toks[s_name],
        data=data,
        train=replace(base.train, steps=args.warmup_steps, output_dir=str(run_dir / "student_warmup")),
    )
    teacher, warm = str(cached_sft(teacher_cfg)), str(cached_sft(student_cfg))

    teachers = [TeacherConfig(name=f"{t_name}-teacher", checkpoint=teacher, tokenizer=toks[t_name])]
    cfg = mopd_config(str(run_dir), teachers, warm, name="cross_opd")
    cfg = replace(
        cfg,
        data=data,
        tokenizer=toks[s_name],
        loss=LossConfig(
            divergence=args.divergence, uld_metric="l1", uld_weight=args.uld_weight, cross_kl=args.cross_kl
        ),
        rollout=RolloutConfig(max_new_tokens=8, temperature=1.0),
        train=replace(cfg.train, steps=args.steps, lr=args.lr, min_lr=args.lr / 10),
    )
    trainer = OPDTrainer(cfg)
    result = trainer.run()

    # Alignment of the reference completions, re-tokenised exactly as the loop does, by content class.
    held = [r for rs in eval_rows.values() for r in rs]
    al = alignment_stats(
        [align_completion(s_tok, s_tok.encode(r.reference), t_tok, t_tok.encode(r.reference)) for r in held]
    )
    train = [
        r for r in read_metrics(Path(cfg.train.output_dir) / "metrics.jsonl", "train") if "align/rate" in r
    ]
    during = sum(r["align/rate"] for r in train) / max(len(train), 1)
    print_table(
        f"Cross-tokeniser OPD ({label[s_name]} student, {label[t_name]} teacher): held-out exact match",
        ["domain", "teacher", "student before", "student after"],
        [
            [d, f"{t:.2f}", f"{result.eval_before[d]:.2f}", f"{result.eval_after[d]:.2f}"]
            for d, t in _teacher_scores(trainer, t_tok).items()
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


def _teacher_scores(trainer, teacher_tok):
    from opd_megatron.train.evaluate import exact_match

    t = next(iter(trainer.teachers.values())).inner
    return exact_match(
        t.model,
        teacher_tok,
        trainer.eval_rows,
        t.groups,
        trainer.cfg.rollout.max_new_tokens,
        trainer.cfg.train.eval_samples,
    )


if __name__ == "__main__":
    sys.exit(main())
