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


def _run_cli(tmp_path, rows: list[dict], *extra: str):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, "-m", "opd_megatron.cli", "run", f"data.train_path={data}", "data.domains=[]",
         "teachers=[{name: self, placement: self}]", f"train.output_dir={out}", "train.steps=2", *extra],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    return r, data, out


def test_bad_messages_rows_stop_an_opd_run_before_training(tmp_path):
    good = {"messages": [{"role": "user", "content": "reverse ab="}], "domain": "reversal", "reference": "ba"}
    rows = [
        good,
        {"messages": [{"role": "wizard", "content": "x"}], "domain": "reversal"},
        {"messages": [], "domain": "reversal"},
        {"messages": [{"role": "user", "content": ["x"]}], "domain": "reversal"},
    ]
    r, data, out = _run_cli(tmp_path, rows)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert f"{data}:2: messages[0] has unknown role 'wizard'" in r.stderr
    assert f"{data}:3: field 'messages' is an empty conversation" in r.stderr
    assert f"{data}:4: messages[0] (user) content must be a string, got list" in r.stderr
    assert not out.exists() or not any(out.rglob("*.distcp"))


def test_a_row_the_model_template_cannot_render_stops_an_opd_run(tmp_path, hf_dirs):
    """A Mistral-style template raises on two user turns in a row: named by file and line, exit 2."""
    ok = {"messages": [{"role": "user", "content": "Name a colour."}], "domain": "chat", "reference": "Blue."}
    twice = {
        "messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}],
        "domain": "chat",
    }
    r, data, out = _run_cli(
        tmp_path,
        [ok, ok, twice],
        "tokenizer.kind=hf",
        f"tokenizer.path={hf_dirs['mistral']}",
        "tokenizer.chat_template=model",
    )
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert any(f"{data}:3: chat template " in line and "must alternate" in line for line in lines), r.stderr
    assert not out.exists() or not any(out.rglob("*.distcp"))
