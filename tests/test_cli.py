"""The CLI reports user mistakes as one clear line and exit status 2, without a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def _cli(*args, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "opd_megatron.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env=env,
    )


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["sft", "train.steps=abc"], "config error: train.steps: expected an integer"),
        (
            ["sft", "model.fp8=e4m3"],
            "config error: model.fp8: FP8 ('e4m3') needs CUDA and Transformer Engine",
        ),
        (["sft", "parallel.tensor_model_parallel_size=3"], "does not divide model.num_attention_heads=4"),
    ],
)
def test_config_errors_exit_2_without_traceback(args, fragment):
    r = _cli(*args)
    assert r.returncode == 2, r.stderr
    assert fragment in r.stderr
    assert "Traceback" not in r.stderr


def test_bad_jsonl_row_names_file_and_line(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(
        json.dumps({"prompt": "p", "domain": "reversal"}) + "\n" + '{"prompt": 3, "domain": "x"}\n'
    )
    r = _cli("sft", f"data.train_path={data}", "data.domains=[]", f"train.output_dir={tmp_path}/out")
    assert r.returncode == 2, r.stderr
    assert f"{data}:2:" in r.stderr and "prompt" in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_init_checkpoint(tmp_path):
    r = _cli(
        "sft",
        f"train.init_checkpoint={tmp_path}/nothing",
        f"train.output_dir={tmp_path}/out",
        "train.steps=1",
    )
    assert r.returncode == 2, r.stderr
    assert f"checkpoint not found: {tmp_path}/nothing does not exist" in r.stderr
