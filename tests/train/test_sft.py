"""SFT learns a built-in domain, and a resumed run reproduces the uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.multirank import run_ranks


def _config(out_dir: str, **train):
    from opd_megatron.config import DataConfig, ModelConfig, RunConfig, TrainConfig

    return RunConfig(
        name="sft-test",
        model=ModelConfig(num_layers=2, hidden_size=128, num_attention_heads=4, max_sequence_length=32),
        data=DataConfig(domains=["reversal"], train_size=600, eval_size=48, difficulty=3),
        train=TrainConfig(
            **{
                "steps": 200,
                "micro_batch_size": 32,
                "lr": 2e-3,
                "min_lr": 2e-4,
                "warmup_steps": 10,
                "eval_every": 0,
                "eval_samples": 48,
                "log_every": 1000,
                "output_dir": out_dir,
                "progress": False,
                **train,
            }
        ),
    )


def _learn(rank, out_dir):
    from opd_megatron.train.sft import run_sft

    r = run_sft(_config(out_dir))
    return r.eval_before["reversal"], r.eval_after["reversal"]


def _losses(out_dir: str) -> list[float]:
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


def _straight_and_resumed(rank, root):
    """Run 8 steps saving at step 4; then resume a copy of the step-4 checkpoint to step 8."""
    import shutil

    from opd_megatron.train.sft import run_sft

    straight = Path(root) / "straight"
    run_sft(_config(str(straight), steps=8, save_every=4, eval_samples=4))
    resumed = Path(root) / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step_0000004", resumed / "checkpoints" / "step_0000004")
    run_sft(_config(str(resumed), steps=8, save_every=4, eval_samples=4))
    return _losses(str(straight)), _losses(str(resumed))


@pytest.mark.slow
def test_sft_raises_held_out_exact_match(tmp_path):
    (before, after) = run_ranks(_learn, 1, timeout=400, args=(str(tmp_path),))[0]
    assert before <= 0.1
    assert after >= before + 0.5, f"exact match only went from {before:.2f} to {after:.2f}"


def test_resume_reproduces_uninterrupted_run(tmp_path):
    straight, resumed = run_ranks(_straight_and_resumed, 1, timeout=400, args=(str(tmp_path),))[0]
    assert len(straight) == 8 and len(resumed) == 4  # the resumed run trained steps 5..8 only
    assert resumed == pytest.approx(straight[4:], abs=1e-6)
    assert len(set(straight)) == 8  # the losses do change from step to step


def _weights(ckpt) -> dict:
    import torch

    from opd_megatron.config import ParallelConfig
    from opd_megatron.distributed import init_distributed
    from opd_megatron.models.checkpoint import load_model_weights
    from opd_megatron.models.gpt import build_gpt_model
    from opd_megatron.tokenization import load_tokenizer

    cfg = _config("unused")
    groups = init_distributed(ParallelConfig())
    model = build_gpt_model(cfg.model, groups, load_tokenizer(cfg.tokenizer).vocab_size, seed=99)
    load_model_weights(ckpt, model)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def _damaged_latest_falls_back(rank, root):
    """8 steps straight; a second run saves at 2, 4, 6, gets its newest checkpoint damaged, and resumes."""
    import torch

    from opd_megatron.models.checkpoint import CheckpointError
    from opd_megatron.train.sft import run_sft

    straight = run_sft(_config(f"{root}/straight", steps=8, eval_samples=4)).checkpoint
    out = Path(root) / "damaged"
    run_sft(_config(str(out), steps=6, save_every=2, keep_last=2, eval_samples=4))
    shard = sorted((out / "checkpoints" / "step_0000006" / "model").glob("*.distcp"))[0]
    with open(shard, "r+b") as fh:  # finite-looking garbage in the middle of the weights
        fh.seek(shard.stat().st_size // 2)
        fh.write(bytes(range(256)) * 16)
    resumed = run_sft(_config(str(out), steps=8, save_every=2, keep_last=2, eval_samples=4))
    same = all(
        torch.equal(a, b) for a, b in zip(_weights(straight).values(), _weights(resumed.checkpoint).values())
    )
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_steps = [
        s for s, x in zip(steps, (out / "metrics.jsonl").read_text().splitlines()) if '"train"' in x
    ]
    # An OPD run pointed at this SFT directory must not silently resume from it.
    from opd_megatron.config import TeacherConfig

    opd_cfg = _config(str(out), steps=10)
    opd_cfg.teachers = [TeacherConfig(name="t", checkpoint=str(resumed.checkpoint))]
    try:
        from opd_megatron.train.opd import OPDTrainer

        OPDTrainer(opd_cfg).run()
        mismatch = None
    except CheckpointError as e:
        mismatch = str(e)
    return same, train_steps, mismatch


def test_damaged_latest_checkpoint_falls_back_and_reproduces_the_straight_run(tmp_path):
    same, train_steps, mismatch = run_ranks(
        _damaged_latest_falls_back, 1, timeout=600, args=(str(tmp_path),)
    )[0]
    assert same, "resuming from the previous intact checkpoint did not reproduce the uninterrupted run"
    assert train_steps == list(range(1, 9)), train_steps  # steps 5, 6 replayed once, never duplicated
    assert mismatch is not None and "sft" in mismatch and "opd" in mismatch, mismatch
