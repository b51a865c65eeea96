"""The run skeleton with ``train.optimizer_impl: megatron``: the optimizer state goes to the distributed
checkpoint, so a run saved at DP=2 (distributed optimizer) resumes at DP=1 and continues the same
trajectory (same global batch: twice the gradient accumulation)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
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


# Several runs in one process, as a pipeline of stages runs them: run 2 gets a Ctrl-C during its last
# step (too late for it to act on); a helper forked after it must not inherit blocked stop signals; run 3
# must stop before its first step; a Ctrl-C between runs must stop the process at once.
_THREE_RUNS = textwrap.dedent(
    """
    import json, os, signal, sys
    from pathlib import Path
    from opd_megatron.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from opd_megatron.train.sft import SFTRun

    root = Path(sys.argv[1])
    # Start from no blocked signals whatever the parent process had blocked (the mask is inherited).
    signal.pthread_sigmask(signal.SIG_SETMASK, [])

    def cfg(name):
        return RunConfig(
            name=name,
            model=ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=2, max_sequence_length=32),
            data=DataConfig(domains=["reversal"], train_size=16, eval_size=2, difficulty=3),
            train=TrainConfig(steps=2, micro_batch_size=4, warmup_steps=1, eval_every=0, eval_samples=1,
                              output_dir=str(root / name), progress=False),
        )

    def blocked_in_forked_child():
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            status = open("/proc/self/status").read().splitlines()
            os.write(w, next(x for x in status if x.startswith("SigBlk:")).split()[1].encode())
            os._exit(0)
        os.close(w)
        mask = int(os.read(r, 64), 16)
        os.waitpid(pid, 0)
        return [s for s in range(1, 65) if mask >> (s - 1) & 1]

    out = {}
    SFTRun(cfg("one")).run()
    second = SFTRun(cfg("two"))
    step = second.train_step
    def last_step_interrupted(i):
        rec = step(i)
        if i == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return rec
    second.train_step = last_step_interrupted
    out["second_steps"] = second.run().steps
    out["main_blocked"] = sorted(signal.pthread_sigmask(signal.SIG_BLOCK, []))
    out["child_blocked"] = blocked_in_forked_child()
    try:
        SFTRun(cfg("three")).run()
        out["third"] = "finished"
    except SystemExit as e:
        out["third"] = e.code
    try:
        os.kill(os.getpid(), signal.SIGINT)
        SFTRun(cfg("four")).run()
        out["fourth"] = "finished"
    except KeyboardInterrupt:
        out["fourth"] = "interrupted"
    # The request run three acted on is spent: a fifth run trains to the end.
    out["fifth"] = SFTRun(cfg("five")).run().steps
    print(json.dumps(out), flush=True)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux")
def test_runs_in_one_process_leave_no_blocked_signals_and_lose_no_stop_request(tmp_path):
    from opd_megatron.train.preemption import EXIT_PREEMPTED

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-c", _THREE_RUNS, str(tmp_path)], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=400)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    stops = {int(signal.SIGTERM), int(signal.SIGUSR1), int(signal.SIGINT)}
    assert out["second_steps"] == 2  # the request came after its last step: the run finished
    assert not stops & set(out["main_blocked"]) and not stops & set(out["child_blocked"]), out
    assert out["third"] == EXIT_PREEMPTED  # the request the second run could not act on stops the next
    assert "stopping on SIGINT" in proc.stderr
    assert not (tmp_path / "three" / "checkpoints").exists()  # stopped before its first step: no save
    assert not (tmp_path / "three" / "metrics.jsonl").exists()
    assert out["fourth"] == "interrupted"  # a Ctrl-C between runs is not swallowed
    assert not (tmp_path / "four").exists()
    assert out["fifth"] == 2
