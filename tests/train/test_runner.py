"""The run skeleton with ``train.optimizer_impl: megatron``: the optimizer state goes to the distributed
checkpoint, so a run saved at DP=2 (distributed optimizer) resumes at DP=1 and continues the same
trajectory (same global batch: twice the gradient accumulation)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from opd_megatron.config import ConfigError, TrainConfig
from tests.multirank import run_ranks


def _config(out_dir: str, accumulation: int):
    from opd_megatron.config import DataConfig, ModelConfig, RunConfig

    return RunConfig(
        name="sft-megatron",
        model=ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=2, max_sequence_length=32),
        data=DataConfig(domains=["reversal"], train_size=64, eval_size=4, difficulty=3),
        train=TrainConfig(
            steps=4, micro_batch_size=4, grad_accumulation=accumulation, lr=2e-3, min_lr=2e-4,
            warmup_steps=1, eval_every=0, eval_samples=2, log_every=1000, save_every=2,
            output_dir=out_dir, progress=False, optimizer_impl="megatron", use_distributed_optimizer=True,
        ),
    )  # fmt: skip


def _losses(out_dir: str) -> list[float]:
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


def _sft(rank, out_dir: str, accumulation: int):
    from opd_megatron.train.sft import run_sft

    run_sft(_config(out_dir, accumulation))


def test_megatron_optimizer_run_resumes_at_another_dp_size(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_ranks(_sft, 2, 400, (str(straight), 1))  # DP=2
    assert (straight / "checkpoints" / "step_0000002" / "optimizer").is_dir()
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step_0000002", resumed / "checkpoints" / "step_0000002")
    run_ranks(_sft, 1, 400, (str(resumed), 2))  # DP=1, same global batch
    a, b = _losses(str(straight)), _losses(str(resumed))
    assert len(a) == 4 and len(b) == 2
    assert b == pytest.approx(a[2:], abs=1e-5)
    assert len(set(a)) == 4


@pytest.mark.parametrize("field", ["use_distributed_optimizer", "overlap_grad_reduce"])
def test_megatron_only_options_need_the_megatron_optimizer(field):
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**{field: True})


def test_token_budget_must_be_non_negative():
    with pytest.raises(ConfigError, match="max_tokens_per_microbatch"):
        TrainConfig(max_tokens_per_microbatch=-1)
