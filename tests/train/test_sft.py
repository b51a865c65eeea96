"""SFT learns a built-in domain, and a resumed run reproduces the uninterrupted one."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from tests.cli_process import one_error_line, run_cli
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


def _shared_runs(rank, root):
    """The straight 8-step run, and a 6-step one saving at steps 2, 4 and 6 (keeping two)."""
    from opd_megatron.train.sft import run_sft

    straight = run_sft(_config(f"{root}/straight", steps=8, eval_samples=4)).checkpoint
    run_sft(_config(f"{root}/saved", steps=6, save_every=2, keep_last=2, eval_samples=4))
    return str(straight)


@pytest.fixture(scope="module")
def damage_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("damage")
    straight = run_ranks(_shared_runs, 1, timeout=600, args=(str(root),))[0]
    assert [p.name for p in sorted((root / "saved" / "checkpoints").iterdir())] == [
        "step_0000004", "step_0000006"
    ]  # fmt: skip
    return root, Path(straight)


def _resume_damaged(rank, out, straight):
    """Resume the run in ``out`` (its newest checkpoint damaged) to step 8; the same weights as the
    straight run? and the steps its log holds."""
    import torch

    from opd_megatron.train.sft import run_sft

    resumed = run_sft(_config(out, steps=8, save_every=2, keep_last=2, eval_samples=4))
    same = all(
        torch.equal(a, b) for a, b in zip(_weights(straight).values(), _weights(resumed.checkpoint).values())
    )
    rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return same, [r["step"] for r in rows if r["kind"] == "train"]


def _shard(ckpt: Path) -> Path:
    return sorted((ckpt / "model").glob("*.distcp"))[0]


def _overwrite_middle(data: bytes):
    def damage(ckpt: Path) -> None:
        shard = _shard(ckpt)
        with open(shard, "r+b") as fh:
            fh.seek(shard.stat().st_size // 2)
            fh.write(data)

    return damage


def _truncate_shard(ckpt: Path) -> None:
    shard = _shard(ckpt)
    with open(shard, "r+b") as fh:
        fh.truncate(shard.stat().st_size // 2)


DAMAGES = {
    "finite garbage in a shard": _overwrite_middle(bytes(range(256)) * 16),
    "NaN bytes in a shard": _overwrite_middle(struct.pack("<f", float("nan")) * 1024),
    "truncated shard": _truncate_shard,
    "empty rank state": lambda ckpt: (ckpt / "rank_state" / "rank_00000.pt").write_bytes(b""),
    "bad meta.json": lambda ckpt: (ckpt / "meta.json").write_text('{"step": 6, '),
    "model/.metadata deleted": lambda ckpt: (ckpt / "model" / ".metadata").unlink(),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_latest_checkpoint_falls_back_and_reproduces_the_straight_run(damage_runs, tmp_path, damage):
    root, straight = damage_runs
    out = Path(shutil.copytree(root / "saved", tmp_path / "damaged"))
    DAMAGES[damage](out / "checkpoints" / "step_0000006")
    same, train_steps = run_ranks(_resume_damaged, 1, timeout=400, args=(str(out), str(straight)))[0]
    assert same, "resuming from the previous intact checkpoint did not reproduce the uninterrupted run"
    assert train_steps == list(range(1, 9)), train_steps  # steps 5, 6 replayed once, never duplicated


def _opd_in_sft_directory(rank, out, teacher):
    from opd_megatron.config import TeacherConfig
    from opd_megatron.models.checkpoint import CheckpointError
    from opd_megatron.train.opd import OPDTrainer

    opd_cfg = _config(out, steps=10)
    opd_cfg.teachers = [TeacherConfig(name="t", checkpoint=teacher)]
    try:
        OPDTrainer(opd_cfg).run()
    except CheckpointError as e:
        return str(e)
    return None


def test_an_opd_run_does_not_resume_an_sft_directory(damage_runs):
    root, straight = damage_runs
    mismatch = run_ranks(_opd_in_sft_directory, 1, timeout=400, args=(str(root / "saved"), str(straight)))[0]
    assert mismatch is not None and "sft" in mismatch and "opd" in mismatch, mismatch


def test_a_run_whose_every_checkpoint_is_damaged_stops_with_one_line(damage_runs, tmp_path):
    root, _ = damage_runs
    out = Path(shutil.copytree(root / "saved", tmp_path / "damaged"))
    for ckpt in (out / "checkpoints").iterdir():
        DAMAGES["NaN bytes in a shard"](ckpt)
    proc = run_cli("sft", "model.hidden_size=128", "model.max_sequence_length=32", "data.domains=[reversal]",
                   "data.train_size=64", "data.eval_size=8", "train.steps=8", f"train.output_dir={out}",
                   "train.progress=false")  # fmt: skip
    line = one_error_line(proc)
    assert line.startswith(f"error: no intact checkpoint in {out / 'checkpoints'}: step_0000006 (")
    assert "step_0000004 (" in line and "checksum mismatch" in line, line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000004", "step_0000006"]
