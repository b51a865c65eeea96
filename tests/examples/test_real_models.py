"""The real-models example end to end (tiny): Hugging Face teacher and student directories, messages data,
the model's own chat template; the exported student answers like the trained Megatron student; a resumed
run reuses the cached conversion; bad Hugging Face inputs are one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli_process import launcher_free_env, run_cli
from tests.hf_model_dirs import break_hf_dir
from tests.multirank import run_ranks

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "real_models" / "run.py"


def _cli(*args, timeout=600) -> subprocess.CompletedProcess:
    return run_cli(*args, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("real_models")
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--out", str(root), "--sft-steps", "40", "--opd-steps", "6"],
        capture_output=True, text=True, timeout=1500, env=launcher_free_env(), cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root


NEW_TOKENS = 8
THINK_OFF = "<|im_start|>assistant\n<think>\n\n</think>\n\n"
"""How the ChatML thinking template opens the answer with ``enable_thinking: false``."""


def _spelled(tok, ids: list[int]) -> str:
    """The text of ``ids`` with special tokens spelled out."""
    pieces = [
        tok.special_token_text(i).encode() if i in tok.special_ids else tok.token_bytes([i])[0] for i in ids
    ]
    return b"".join(pieces).decode()


def _greedy_both(rank, root: str):
    """Greedy completions of held-out prompts: the exported student in transformers, and the trained
    Megatron student from its last checkpoint; also the run's tokenizer settings, its rendered prompts
    and the end-of-turn id."""
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
    end = render.end_ids[0]
    ours = greedy_generate(model, prompts, NEW_TOKENS, end, tok.pad_id, groups)
    hf = AutoModelForCausalLM.from_pretrained(Path(root) / "student_export", torch_dtype=torch.float32).eval()
    theirs = []
    for p in prompts:
        out = hf.generate(
            torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), max_new_tokens=NEW_TOKENS,
            do_sample=False, eos_token_id=end, pad_token_id=tok.pad_id,
            suppress_tokens=list(range(tok.vocab_size, hf.config.vocab_size)) or None,
        )  # fmt: skip
        theirs.append(out[0, len(p) :].tolist())
    run = {
        "chat_template": cfg.tokenizer.chat_template,
        "template_kwargs": dict(cfg.tokenizer.template_kwargs),
        "prompts": [_spelled(tok, p) for p in prompts],
        "end": end,
        "im_end": tok.special_token_id("<|im_end|>"),
    }
    return [list(o) for o in ours], theirs, run


@pytest.fixture(scope="module")
def greedy(example):
    return run_ranks(_greedy_both, 1, timeout=300, args=(str(example),))[0]


def test_the_exported_student_answers_like_the_trained_one(example, greedy):
    ours, theirs, run = greedy
    assert any(ours), "every greedy completion is empty: the comparison would say nothing"
    for a, b in zip(ours, theirs):
        # The Megatron greedy leaves the end token out; where it stopped before NEW_TOKENS, transformers'
        # next token is that end token, and it stops there too.
        assert b == (a + [run["end"]] if len(a) < NEW_TOKENS else a), (a, b)
    files = {p.name for p in (example / "student_export").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= files
    assert (
        "chat_template.jinja" in files
        or "chat_template" in (example / "student_export" / "tokenizer_config.json").read_text()
    )


def test_the_run_used_the_models_template_and_its_end_of_turn(example, greedy):
    """Prompts rendered by the model's own Jinja template with ``enable_thinking: false`` (the empty think
    block opens the answer), completions ending at ``<|im_end|>``: some rollouts of the run did."""
    from opd_megatron.train.metrics import read_metrics

    _, _, run = greedy
    assert run["chat_template"] == "model" and run["template_kwargs"] == {"enable_thinking": False}
    assert run["end"] == run["im_end"]
    for text in run["prompts"]:
        assert text.startswith("<|im_start|>system\nAnswer with the result only.<|im_end|>\n"), text
        assert text.endswith(THINK_OFF), text
    train = read_metrics(example / "student_opd" / "metrics.jsonl", "train")
    ended = [r["rollout_ended_fraction"] for r in train if r.get("rollout_ended_fraction") is not None]
    assert ended and max(ended) > 0, ended  # at least one rollout ended at <|im_end|>


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


@pytest.mark.parametrize(
    "command, how, field, needle",
    [
        ("sft", "architecture", "train.init_checkpoint", "config.json: unsupported architecture ['GPT2LMHeadModel']"),
        ("sft", "weights", "train.init_checkpoint", ": tensors required by config.json are missing: model.layers.3."),
        ("sft", "tokenizer", "train.init_checkpoint", ": no tokenizer.json or tokenizer.model"),
        ("sft", "contradiction", "model.num_layers", "given 7 but the HF config says 3"),
        ("run", "architecture", "teachers[0].checkpoint", "config.json: unsupported architecture ['GPT2LMHeadModel']"),
        ("run", "tokenizer", "teachers[0].checkpoint", ": no tokenizer.json or tokenizer.model"),
    ],
)  # fmt: skip
def test_bad_hugging_face_inputs_are_one_line_errors(example, tmp_path, command, how, field, needle):
    """One line naming the field and the broken directory's file (or the contradicting field); nothing
    converted or trained."""
    if how == "contradiction":
        bad, extra = example / "teacher_hf", ["model.num_layers=7"]
    else:
        bad, extra = break_hf_dir(example / "teacher_hf", tmp_path / how, how), []
    where = "train.init_checkpoint" if command == "sft" else "teachers.0.checkpoint"
    config = example / ("sft.yaml" if command == "sft" else "opd.yaml")
    out = [f"train.output_dir={tmp_path}/out", f"train.export_hf={tmp_path}/export"]
    proc = _cli(command, str(config), f"{where}={bad}", *out, *extra)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"config error: {field}: "), proc.stderr
    assert needle in proc.stderr, proc.stderr
    if how != "contradiction":
        assert f"{field}: {bad}" in proc.stderr, proc.stderr  # the broken directory, then its file
    assert not (tmp_path / "out" / "checkpoints").exists()
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
    if command == "run":  # rejected before anything was converted
        assert not (tmp_path / "out" / "hf_cache").exists()
