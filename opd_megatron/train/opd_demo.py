"""The OPD main job (``opd-megatron run`` without a config): distil an SFT teacher into a smaller student.

Stage 1 trains a teacher (4 layers) by SFT on two built-in domains (cached under
``runs/opd_demo/teacher``: a second run reuses it). Stage 2 distils it on-policy, with the full-vocabulary
reverse KL on the student's own samples, into a student with half its layers, warm-started by a short
SFT so its first rollouts are not noise. The table compares teacher, student
before OPD and student after OPD per domain, with the held-out reverse KL to the teacher.
"""

from __future__ import annotations

import time
from pathlib import Path

from opd_megatron.config import (
    DataConfig,
    LossConfig,
    ModelConfig,
    RolloutConfig,
    RunConfig,
    TeacherConfig,
    TrainConfig,
    load_config,
)
from opd_megatron.models.checkpoint import latest_checkpoint, read_meta

DOMAINS = ["reversal", "sorting"]


def teacher_config(root: str) -> RunConfig:
    return RunConfig(
        name="teacher",
        model=ModelConfig(
            num_layers=4, hidden_size=128, num_attention_heads=4, num_query_groups=2, max_sequence_length=32
        ),
        data=DataConfig(domains=list(DOMAINS), train_size=3000, eval_size=100, difficulty=3),
        train=TrainConfig(
            steps=500,
            micro_batch_size=32,
            lr=2e-3,
            min_lr=2e-4,
            warmup_steps=20,
            eval_every=0,
            eval_samples=64,
            log_every=50,
            output_dir=f"{root}/teacher",
        ),
    )


def student_warmup_config(root: str) -> RunConfig:
    """A brief SFT of the small student: the 'before' point of the distillation."""
    return RunConfig(
        name="student-warmup",
        model=ModelConfig(
            num_layers=2, hidden_size=128, num_attention_heads=4, num_query_groups=2, max_sequence_length=32
        ),
        data=DataConfig(domains=list(DOMAINS), train_size=3000, eval_size=100, difficulty=3),
        train=TrainConfig(
            steps=60,
            micro_batch_size=32,
            lr=2e-3,
            min_lr=2e-4,
            warmup_steps=10,
            eval_every=0,
            eval_samples=64,
            log_every=20,
            output_dir=f"{root}/student_warmup",
        ),
    )


def opd_config(root: str, teacher_ckpt: str, student_init: str) -> RunConfig:
    warm = student_warmup_config(root)
    return RunConfig(
        name="opd",
        model=warm.model,
        teachers=[TeacherConfig(name="teacher", checkpoint=teacher_ckpt)],
        loss=LossConfig(divergence="reverse_kl"),
        rollout=RolloutConfig(max_new_tokens=8, temperature=1.0),
        data=warm.data,
        train=TrainConfig(
            steps=300,
            micro_batch_size=32,
            lr=2e-3,
            min_lr=2e-4,
            warmup_steps=10,
            eval_every=100,
            eval_samples=64,
            log_every=10,
            output_dir=f"{root}/opd",
            init_checkpoint=student_init,
            resume=False,
        ),
    )


def _cached_sft(cfg: RunConfig):
    from opd_megatron.train.sft import run_sft

    latest = latest_checkpoint(Path(cfg.train.output_dir) / "checkpoints")
    if latest is not None and read_meta(latest)["step"] >= cfg.train.steps:
        print(f"{cfg.name}: reusing {latest}", flush=True)
        return latest
    print(f"{cfg.name}: SFT for {cfg.train.steps} steps", flush=True)
    return run_sft(cfg).checkpoint


def run_opd_demo(path: str | None, overrides: list[str], root: str = "runs/opd_demo") -> int:
    from opd_megatron.train.opd import OPDTrainer
    from opd_megatron.train.report import print_table

    t0 = time.monotonic()
    teacher_ckpt = _cached_sft(teacher_config(root))
    student_init = _cached_sft(student_warmup_config(root))
    cfg = load_config(path, overrides, base=opd_config(root, str(teacher_ckpt), str(student_init)))
    trainer = OPDTrainer(cfg)
    from opd_megatron.train.evaluate import exact_match

    teacher_em = exact_match(
        trainer.teacher.model,
        trainer.tokenizer,
        trainer.eval_rows,
        trainer.groups,
        cfg.rollout.max_new_tokens,
        cfg.train.eval_samples,
    )
    result = trainer.run()
    rows = [
        [d, f"{teacher_em[d]:.2f}", f"{result.eval_before[d]:.2f}", f"{result.eval_after[d]:.2f}"]
        for d in result.eval_after
    ]
    rows.append(["reverse KL to teacher", "0", f"{result.kl_before:.3f}", f"{result.kl_after:.3f}"])
    print_table(
        "On-policy distillation: held-out exact match per domain",
        ["domain", "teacher", "student before OPD", "student after OPD"],
        rows,
    )
    n_t = sum(p.numel() for p in trainer.teacher.model.parameters())
    n_s = sum(p.numel() for p in trainer.student.parameters())
    print(
        f"teacher {n_t:,} parameters, student {n_s:,}; wall time {time.monotonic() - t0:.0f}s; "
        f"curves: {cfg.train.output_dir}/curves.png"
    )
    return 0
