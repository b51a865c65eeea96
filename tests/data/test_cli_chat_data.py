"""Bad chat data through the CLI: every bad row named by file and line, exit 2, no traceback, nothing trained."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_bad_messages_rows_stop_the_run_before_training(tmp_path):
    good = {"messages": [{"role": "user", "content": "reverse ab="}], "domain": "reversal", "reference": "ba"}
    rows = [
        good,
        {"messages": [{"role": "wizard", "content": "x"}], "domain": "reversal"},
        good,
        {"messages": [], "domain": "reversal"},
        {"messages": [{"role": "user", "content": ["x"]}], "domain": "reversal"},
    ]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, "-m", "opd_megatron.cli", "sft", f"data.train_path={data}", "data.domains=[]",
         f"train.output_dir={out}", "train.steps=2"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert f"{data}:2: messages[0] has unknown role 'wizard'" in r.stderr
    assert f"{data}:4: field 'messages' is an empty conversation" in r.stderr
    assert f"{data}:5: messages[0] (user) content must be a string, got list" in r.stderr
    assert "3 bad rows in" in r.stderr
    assert not out.exists() or not any(out.rglob("*.distcp"))
