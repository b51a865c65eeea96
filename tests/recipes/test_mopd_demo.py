"""The demo's code path on a tiny budget: the table, results.json and curves.png are written and agree
with each other and with the runs' own metrics."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from opd_megatron.train.report import demo_results, markdown_table, table_rows

TINY = (
    "Budget(expert_steps=4, warmup_steps=4, opd_steps=3, eval_every=2, eval_samples=4, train_size=64, "
    "eval_size=8, log_every=2)"
)


def _run_tiny_demo(root: Path) -> str:
    code = (
        "from opd_megatron.recipes.mopd_demo import Budget, run_mopd_demo\n"
        f"raise SystemExit(run_mopd_demo(None, ['train.progress=false'], root={str(root)!r}, budget={TINY}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).parents[2],
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def test_tiny_demo_writes_consistent_table_json_and_png(tmp_path):
    from opd_megatron.recipes.mopd_demo import MOPD, SEQKD, STUDENT_RUNS
    from opd_megatron.train.metrics import read_metrics

    stdout = _run_tiny_demo(tmp_path)
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
