"""Configs of a single-teacher OPD setup on two built-in domains (used by
``examples/compare_on_off_policy/run.py``): a 4-layer SFT teacher, a 2-layer student warm-started by a
short SFT so its first rollouts are not noise, and the on-policy distillation between them with the
full-vocabulary reverse KL on the student's own samples. Train them with
:func:`~opd_megatron.recipes.mopd_demo.cached_sft` (a second run reuses the checkpoints).
"""

from __future__ import annotations

from opd_megatron.config import (
    DataConfig,
    LossConfig,
    ModelConfig,
    RolloutConfig,
    RunConfig,
    TeacherConfig,
    TrainConfig,
)

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
