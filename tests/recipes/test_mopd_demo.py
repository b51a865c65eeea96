"""The demo's code path on a tiny budget: a job stopped in stage 2 resumes the stopped run; the table,
results.json and curves.png are written and agree with each other and with the runs' own metrics."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from opd_megatron.train.preemption import EXIT_PREEMPTED
from opd_megatron.train.report import demo_results, markdown_table, table_rows

TINY = (
    "Budget(expert_steps=4, warmup_steps=4, opd_steps=3, eval_every=2, eval_samples=4, train_size=64, "
    "eval_size=8, log_every=2)"
)


# The first job stops itself (SIGTERM, as a preemption sends) after step 2 of the MOPD run's 3.
_INTERRUPT_MOPD = """
import os, signal
from opd_megatron.train.opd import OPDTrainer
step = OPDTrainer.train_step
def train_step(self, i):
    rec = step(self, i)
    if self.cfg.name == "mopd" and i == 1:
        os.kill(os.getpid(), signal.SIGTERM)
    return rec
OPDTrainer.train_step = train_step
"""


def _run_tiny_demo(root: Path, before: str = "", expect: int = 0) -> subprocess.CompletedProcess:
    code = (
        before + "from opd_megatron.recipes.mopd_demo import Budget, run_mopd_demo\n"
        f"raise SystemExit(run_mopd_demo(None, ['train.progress=false'], root={str(root)!r}, budget={TINY}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).parents[2],
    )
    assert out.returncode == expect, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def interrupted_demo(tmp_path_factory):
    """The tiny demo stopped in its first stage-2 run, then run again to the end."""
    root = tmp_path_factory.mktemp("demo")
    first = _run_tiny_demo(root, _INTERRUPT_MOPD, expect=EXIT_PREEMPTED)
    second = _run_tiny_demo(root)
    return root, first, second.stdout


def test_interrupted_stage_2_run_resumes_where_it_stopped(interrupted_demo):
    from opd_megatron.recipes.mopd_demo import MOPD
    from opd_megatron.train.metrics import read_metrics

    root, first, stdout = interrupted_demo
    assert "stopping on SIGTERM" in first.stderr
    assert "OPD mopd:" in first.stdout and "/seqkd" not in first.stdout  # it stopped in the MOPD run
    assert "OPD mopd:" in stdout and "resuming at step 2" in stdout
    log = root / "mopd" / "metrics.jsonl"
    assert [r["step"] for r in read_metrics(log, "train")] == [1, 2, 3]  # steps 1, 2 not run again
    assert [r["step"] for r in read_metrics(log, "preempted")] == [2]  # the first job's log was kept
    evals = read_metrics(log, "eval")
    assert [r["step"] for r in evals] == [0, 2, 3]
    # Its teacher counters continue: every rollout of the 3 steps (32 a step) went to some expert.
    line = next(x for x in stdout.splitlines() if "rollouts per teacher in the MOPD run" in x)
    assert sum(int(part.rsplit(": ", 1)[1]) for part in line.split("run: ", 1)[1].split(", ")) == 3 * 32
    # The resumed run's results: "before" is the evaluation its fresh start logged, "after" its last.
    table = json.loads((root / "results.json").read_text())
    for d in ("addition", "reversal", "sorting"):
        assert table["cells"]["student before"][d]["seeds"] == [evals[0][f"exact_match/{d}"]]
        assert table["cells"][MOPD][d]["seeds"] == [evals[-1][f"exact_match/{d}"]]


def test_a_stage_2_directory_of_another_configuration_is_set_aside_not_resumed(tmp_path, capsys):
    from opd_megatron.config import save_config
    from opd_megatron.recipes.mopd_demo import Budget, expert_teachers, mopd_config, set_aside_if_changed

    cfg = mopd_config(str(tmp_path), expert_teachers({"addition": "e"}), "w", budget=Budget(opd_steps=3))
    run_dir = tmp_path / "mopd"
    (run_dir / "checkpoints").mkdir(parents=True)
    save_config(cfg, run_dir / "config.yaml")
    assert set_aside_if_changed(cfg) is None and run_dir.is_dir()  # the same run: resumed
    longer = mopd_config(str(tmp_path), expert_teachers({"addition": "e"}), "w", budget=Budget(opd_steps=5))
    assert set_aside_if_changed(longer) == tmp_path / "mopd.previous1"
    assert not run_dir.exists() and (tmp_path / "mopd.previous1" / "checkpoints").is_dir()
    assert "moved to" in capsys.readouterr().out


def test_tiny_demo_writes_consistent_table_json_and_png(interrupted_demo):
    from opd_megatron.recipes.mopd_demo import MOPD, SEQKD, STUDENT_RUNS
    from opd_megatron.train.metrics import read_metrics

    tmp_path, _, stdout = interrupted_demo
    first = stdout.splitlines()[:6]
    assert any("stage 1" in line for line in first) and any("results.json" in line for line in first)
    table = json.loads((tmp_path / "results.json").read_text())
    png = (tmp_path / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # Every printed row of the table is on the console, cell for cell.
    for row in table_rows(table):
        assert all(cell in stdout for cell in row), row
    # The students' cells are their runs' last evaluations; the off-policy run has the same student compute.
    for label, run in (("mopd", MOPD), ("seqkd", SEQKD)):
        last = read_metrics(tmp_path / label / "metrics.jsonl", "eval")[-1]
        for d in ("addition", "reversal", "sorting"):
            assert table["cells"][run][d]["seeds"] == [last[f"exact_match/{d}"]]
    seqkd_steps = read_metrics(tmp_path / "seqkd" / "metrics.jsonl", "train")[-1]["step"]
    assert seqkd_steps == round(table["budget"]["opd_steps"] * 4 / 3)
    assert set(STUDENT_RUNS) <= set(table["columns"])


def test_mean_and_std_over_seeds():
    per_seed = [
        {"cells": {"a": {"x": 0.5, "y": 1.0}}},
        {"cells": {"a": {"x": 0.7, "y": 0.0}}},
    ]
    t = demo_results(per_seed, ["a"], ["x", "y"])
    assert t["cells"]["a"]["x"]["mean"] == 0.6
    assert abs(t["cells"]["a"]["x"]["std"] - 0.1414) < 1e-3
    assert t["cells"]["a"]["mean"]["seeds"] == [0.75, 0.35]
    assert table_rows(t) == [["x", "0.60 ± 0.14"], ["y", "0.50 ± 0.71"], ["mean", "0.55 ± 0.28"]]
    assert markdown_table(t).splitlines()[2] == "| x | 0.60 ± 0.14 |"
