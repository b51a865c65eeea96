"""kill -9 at random points of a run that saves every step, over and over, then resume to the end: no step
lost, no step logged twice, the final weights equal an uninterrupted run's, and no process survives."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
STEPS = 16


def _args(out: Path) -> list[str]:
    return [
        sys.executable, "-m", "opd_megatron.cli", "sft", "data.domains=[reversal]", "data.train_size=200",
        "data.eval_size=16", "model.num_layers=1", "model.hidden_size=64", "model.num_attention_heads=4",
        "model.max_sequence_length=32", f"train.steps={STEPS}", "train.micro_batch_size=8", "train.save_every=1",
        "train.keep_last=2", "train.eval_every=0", "train.eval_samples=4", "train.progress=false",
        f"train.output_dir={out}",
    ]  # fmt: skip


def _env(marker: str) -> dict:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    key, value = marker.split("=", 1)
    return {**env, key: value, "OMP_NUM_THREADS": "1"}


def _marked(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if marker.encode() in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                    state = Path(f"/proc/{entry}/stat").read_text().split(")")[-1].split()[0]
                    if state != "Z":
                        found.append(int(entry))
    return found


def _last_step(metrics: Path) -> int:
    """The highest train step logged so far (a line being written may be partial)."""
    last = 0
    with contextlib.suppress(OSError):
        for line in metrics.read_text().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if record.get("kind") == "train":
                    last = max(last, record["step"])
    return last


@pytest.mark.timeout(900)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_ten_kills_during_saves_lose_nothing_and_leave_nothing(tmp_path):
    marker = f"OPD_KILL_TEST={uuid.uuid4().hex}"
    start = time.monotonic()
    straight = subprocess.run(
        _args(tmp_path / "straight"), cwd=REPO, env=_env(marker), capture_output=True, timeout=300
    )
    assert straight.returncode == 0, straight.stderr[-2000:]
    # Kill times scale with this machine's speed: a fixed delay misses a fast machine's whole run.
    per_step_s = (time.monotonic() - start) / STEPS
    out, rng, kills = tmp_path / "killed", random.Random(11), 0
    while kills < 10:
        before = _last_step(out / "metrics.jsonl")
        proc = subprocess.Popen(
            _args(out), cwd=REPO, env=_env(marker), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        if kills % 4 == 3:  # now and then during start-up and checkpoint restore
            deadline = time.monotonic() + rng.uniform(0.5, 3.0)
        else:  # otherwise once this run has made progress, at a random moment of a step (mostly saving)
            deadline = float("inf")
        while proc.poll() is None and time.monotonic() < deadline:
            if deadline == float("inf") and _last_step(out / "metrics.jsonl") > before:
                deadline = time.monotonic() + rng.uniform(0.0, per_step_s / 2)
            time.sleep(0.02)
        if proc.poll() is not None:
            break  # finished before the kill
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        kills += 1
    end = subprocess.run(_args(out), cwd=REPO, env=_env(marker), capture_output=True, timeout=300)
    assert end.returncode == 0, end.stderr[-2000:]
    time.sleep(1.0)
    survivors = _marked(marker)
    for pid in survivors:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    assert not survivors, f"{len(survivors)} processes outlived the killed runs"
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["kind"] == "train"]
    assert train_steps == list(range(1, STEPS + 1)), train_steps  # none lost, none twice
    assert sum(r["kind"] == "eval" and r["step"] == STEPS for r in records) == 1
    assert kills >= 3, f"only {kills} kills landed before the run finished"
    from tests.multirank import run_ranks

    wa, wb = run_ranks(_load_pair, 1, timeout=300, args=(str(tmp_path / "straight"), str(out)))[0]
    assert wa.keys() == wb.keys() and wa
    for k in wa:  # bitwise: the resumed trajectory is the uninterrupted one
        assert torch.equal(wa[k], wb[k]), k


def _load_pair(rank, straight: str, killed: str):
    from opd_megatron.config import ParallelConfig
    from opd_megatron.distributed import init_distributed
    from opd_megatron.models.checkpoint import load_model_weights, read_config
    from opd_megatron.models.gpt import build_gpt_model
    from opd_megatron.tokenization import load_tokenizer

    out = []
    groups = init_distributed(ParallelConfig())
    for root in (straight, killed):
        ckpt = Path(root) / "checkpoints" / f"step_{STEPS:07d}"
        cfg = read_config(ckpt)
        model = build_gpt_model(cfg.model, groups, load_tokenizer(cfg.tokenizer).vocab_size, seed=5)
        load_model_weights(ckpt, model)
        out.append(
            {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        )
    return out
