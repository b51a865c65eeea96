"""An OPD step at TP=2 and at PP=2 (student and co-located teacher both split, the loss on the last
stage) gives the loss, gradient norm and update of the single-process step from the same checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.multirank import run_ranks


def _cfgs(root: str, tp: int = 1, pp: int = 1, teacher_tp: int | None = None):
    from opd_megatron.config import (
        DataConfig,
        LossConfig,
        ModelConfig,
        ParallelConfig,
        RunConfig,
        TeacherConfig,
        TrainConfig,
    )

    data = DataConfig(domains=["reversal"], train_size=200, eval_size=16, difficulty=3)
    teacher = RunConfig(
        name="t",
        model=ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, max_sequence_length=32),
        data=data,
    )
    student = RunConfig(
        name="s",
        model=ModelConfig(
            num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, max_sequence_length=32
        ),
        parallel=ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp),
        teachers=[
            TeacherConfig(name="t", checkpoint=f"{root}/teacher", tensor_model_parallel_size=teacher_tp)
        ],
        # lambda=0 with dataset completions: the batch is the same whatever the layout.
        loss=LossConfig(divergence="jsd", jsd_beta=0.3, on_policy_lambda=0.0, chunk_size=7),
        data=data,
        train=TrainConfig(
            micro_batch_size=4,
            grad_accumulation=2,
            lr=1e-2,
            warmup_steps=0,
            output_dir=f"{root}/run{tp}{pp}",
            init_checkpoint=f"{root}/student",
            progress=False,
        ),
    )
    return teacher, student


def _save(rank, root):
    from opd_megatron.distributed import init_distributed
    from opd_megatron.models.checkpoint import save_checkpoint
    from opd_megatron.models.gpt import build_gpt_model
    from opd_megatron.tokenization import load_tokenizer

    teacher_cfg, student_cfg = _cfgs(root)
    groups = init_distributed(student_cfg.parallel)
    vocab = load_tokenizer(student_cfg.tokenizer).vocab_size
    save_checkpoint(
        f"{root}/teacher",
        1,
        build_gpt_model(teacher_cfg.model, groups, vocab, seed=1),
        groups,
        config=teacher_cfg,
    )
    save_checkpoint(
        f"{root}/student",
        1,
        build_gpt_model(student_cfg.model, groups, vocab, seed=2),
        groups,
        config=student_cfg,
    )


def _step(rank, root, tp, pp, teacher_tp=None):
    from opd_megatron.train.batch import DataCursor
    from opd_megatron.train.opd import OPDTrainer

    trainer = OPDTrainer(_cfgs(root, tp, pp, teacher_tp)[1])
    first = trainer.train_step(0)
    trainer.cursor = DataCursor(len(trainer.train_rows), trainer.cfg.data.seed)  # the same batch again
    second = trainer.train_step(0)
    return first["loss"], first["grad_norm"], second["loss"], first["kl_per_token"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("opd_parallel"))
    run_ranks(_save, 1, args=(root,))
    return root, run_ranks(_step, 1, args=(root, 1, 1))[0]


@pytest.mark.parametrize("tp,pp,teacher_tp", [(2, 1, None), (1, 2, None), (2, 1, 1)])
def test_opd_step_matches_single_process(reference, tp, pp, teacher_tp):
    """Student and teacher at TP=2; both pipelined at PP=2; student TP=2 with a replicated TP=1 teacher."""
    root, (loss, norm, after, kl) = reference
    assert after < loss  # the reference step changed the student
    for r_loss, r_norm, r_after, r_kl in run_ranks(_step, 2, args=(root, tp, pp, teacher_tp)):
        assert r_loss == pytest.approx(loss, abs=1e-5)
        assert r_norm == pytest.approx(norm, rel=1e-4)
        assert r_after == pytest.approx(after, abs=1e-5)
        assert r_kl == pytest.approx(kl, abs=1e-5)
    assert Path(root, "teacher").exists()
