"""The real-models example end to end (tiny): Hugging Face teacher and student directories, messages data,
the model's own chat template; the exported student answers like the trained Megatron student; a resumed
run reuses the cached conversion; bad Hugging Face inputs are one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.multirank import run_ranks

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "real_models" / "run.py"


def _env() -> dict:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR")
    return {k: v for k, v in os.environ.items() if k not in drop}


def _cli(*args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "opd_megatron.cli", *args], capture_output=True, text=True, timeout=timeout,
        env=_env(), cwd=ROOT,
    )  # fmt: skip


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("real_models")
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--out", str(root), "--sft-steps", "40", "--opd-steps", "6"],
        capture_output=True, text=True, timeout=1500, env=_env(), cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root


def _greedy_both(rank, root: str):
    """Greedy completions of held-out prompts: the exported student in transformers, and the trained
    Megatron student from its last checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM

    from opd_megatron.data.render import PromptRenderer
    from opd_megatron.data.sources import read_rows
    from opd_megatron.distributed import init_distributed
    from opd_megatron.models.checkpoint import latest_checkpoint, load_model_weights, read_config
    from opd_megatron.models.gpt import build_gpt_model
    from opd_megatron.rollout.greedy import greedy_generate
    from opd_megatron.tokenization import load_tokenizer

    ckpt = latest_checkpoint(Path(root) / "student_opd" / "checkpoints")
    cfg = read_config(ckpt)
    tok = load_tokenizer(cfg.tokenizer)
    render = PromptRenderer.from_config(tok, cfg.tokenizer)
    rows = read_rows(Path(root) / "eval.jsonl")[:12]
    prompts = [render(r) for r in rows]
    groups = init_distributed(cfg.parallel)
    model = build_gpt_model(cfg.model, groups, tok.vocab_size)
    load_model_weights(ckpt, model)
    ours = greedy_generate(model, prompts, 8, render.end_ids[0], tok.pad_id, groups)
    hf = AutoModelForCausalLM.from_pretrained(Path(root) / "student_export", torch_dtype=torch.float32).eval()
    theirs = []
    for p in prompts:
        out = hf.generate(
            torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), max_new_tokens=8,
            do_sample=False, eos_token_id=render.end_ids[0], pad_token_id=tok.pad_id,
            suppress_tokens=list(range(tok.vocab_size, hf.config.vocab_size)) or None,
        )  # fmt: skip
        theirs.append(out[0, len(p) :].tolist())
    return [list(o) for o in ours], theirs


def test_the_exported_student_answers_like_the_trained_one(example):
    ours, theirs = run_ranks(_greedy_both, 1, timeout=300, args=(str(example),))[0]
    for a, b in zip(ours, theirs):
        n = len(a)  # transformers keeps generating no further than the end-of-turn token either
        assert b[:n] == a, (a, b)
    files = {p.name for p in (example / "student_export").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= files
    assert (
        "chat_template.jinja" in files
        or "chat_template" in (example / "student_export" / "tokenizer_config.json").read_text()
    )


def test_resume_reuses_the_cached_conversion(example):
    cache = example / "student_opd" / "hf_cache"

    def stamps():
        return {str(m.relative_to(cache)): m.stat().st_mtime_ns for m in cache.glob("*/*/meta.json")}

    before = stamps()
    assert len(before) == 2  # the teacher and the student, converted once each
    proc = _cli("run", str(example / "opd.yaml"), "train.steps=8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = stamps()
    assert after == before, "the resumed run converted a Hugging Face directory again"
    assert "resuming at step 6" in proc.stdout


def _broken(example: Path, tmp: Path, how: str) -> Path:
    d = tmp / how
    shutil.copytree(example / "teacher_hf", d)
    cfg = json.loads((d / "config.json").read_text())
    if how == "architecture":
        cfg["architectures"] = ["GPT2LMHeadModel"]
        cfg["model_type"] = "gpt2"
    elif how == "weights":
        cfg["num_hidden_layers"] += 1  # the safetensors hold one layer fewer
    (d / "config.json").write_text(json.dumps(cfg))
    if how == "tokenizer":
        (d / "tokenizer.json").unlink()
    return d


@pytest.mark.parametrize(
    "how,needle",
    [("architecture", "GPT2LMHeadModel"), ("weights", "model.layers.3"), ("tokenizer", "tokenizer"),
     ("contradiction", "model.num_layers")],
)  # fmt: skip
def test_bad_hugging_face_inputs_are_one_line_errors(example, tmp_path, how, needle):
    init = example / "teacher_hf" if how == "contradiction" else _broken(example, tmp_path, how)
    extra = ["model.num_layers=7"] if how == "contradiction" else []
    proc = _cli(
        "sft",
        str(example / "sft.yaml"),
        f"train.init_checkpoint={init}",
        f"train.output_dir={tmp_path}/out",
        *extra,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert needle in proc.stderr, proc.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()
