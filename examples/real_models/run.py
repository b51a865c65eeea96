"""Distil with models and data as users have them: Hugging Face directories, a chat template, messages.

Everything is built here, tiny and random (no downloads): a byte-level BPE tokenizer trained locally with
a ChatML template that has Qwen3's thinking switch, a Qwen3-shaped teacher and a smaller Qwen3 student as
Hugging Face directories, and a ``messages`` JSONL of the reversal domain. Then, with nothing converted
by hand:

1. the teacher is fine-tuned from its Hugging Face directory (``opd-megatron sft``, the model section
   taken from the directory's config) and exported back as a Hugging Face directory;
2. the student distils that exported teacher on-policy (``opd-megatron run``; prompts rendered with
   the model's own template, ``enable_thinking: false``, completions ending at ``<|im_end|>``) and is
   exported as a Hugging Face directory too.

    python examples/real_models/run.py [--out runs/real_models] [--sft-steps 300] [--opd-steps 150]

The configs it writes (``sft.yaml``, ``opd.yaml``) are what a real run looks like, with paths changed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SHAPES = {
    "teacher": {"num_hidden_layers": 3, "hidden_size": 128, "intermediate_size": 352},
    "student": {"num_hidden_layers": 2, "hidden_size": 128, "intermediate_size": 352},
}


def build_model_dir(path: Path, tokenizer_dir: Path, layers_etc: dict, seed: int) -> Path:
    """A random Qwen3 model saved as a Hugging Face directory, with the tokenizer files next to it."""
    import shutil

    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from opd_megatron.config import TokenizerConfig
    from opd_megatron.tokenization import load_tokenizer

    vocab = load_tokenizer(TokenizerConfig(kind="hf", path=str(tokenizer_dir))).vocab_size
    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=vocab, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        max_position_embeddings=128, tie_word_embeddings=True, rms_norm_eps=1e-6, **layers_etc,
    )  # fmt: skip
    Qwen3ForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, path / f.name)
    return path


def write_messages(path: Path, domain: str = "reversal", n: int = 2000, split: str = "train") -> Path:
    """The domain's rows as OpenAI ``messages`` (a system turn, the user's prompt, the answer)."""
    from opd_megatron.data.domains import build_split

    rows = build_split(domain, split, n, seed=0, difficulty=3)
    with open(path, "w") as fh:
        for r in rows:
            messages = [
                {"role": "system", "content": "Answer with the result only."},
                {"role": "user", "content": r.prompt},
                {"role": "assistant", "content": r.reference},
            ]
            fh.write(json.dumps({"messages": messages, "domain": domain}) + "\n")
    return path


def configs(root: Path, sft_steps: int, opd_steps: int) -> tuple[dict, dict]:
    data = {"domains": [], "train_path": str(root / "train.jsonl"), "eval_path": str(root / "eval.jsonl")}
    tok = {"chat_template": "model", "template_kwargs": {"enable_thinking": False}}
    train = {"micro_batch_size": 32, "lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 10, "eval_every": 0,
             "eval_samples": 64, "log_every": 50}  # fmt: skip
    sft = {
        "name": "teacher-sft",
        "tokenizer": tok,
        "model": {"max_sequence_length": 64},
        "data": data,
        "train": {**train, "steps": sft_steps, "output_dir": str(root / "teacher_sft"),
                  "init_checkpoint": str(root / "teacher_hf"), "export_hf": str(root / "teacher_trained")},
    }  # fmt: skip
    opd = {
        "name": "student-opd",
        "tokenizer": tok,
        "model": {"max_sequence_length": 64},
        "teachers": [{"name": "teacher", "checkpoint": str(root / "teacher_trained")}],
        "rollout": {"max_new_tokens": 8, "temperature": 1.0},
        "data": data,
        "train": {**train, "steps": opd_steps, "output_dir": str(root / "student_opd"), "eval_pass_k": 0,
                  "init_checkpoint": str(root / "student_hf"), "export_hf": str(root / "student_export")},
    }  # fmt: skip
    return sft, opd


def build(root: Path, sft_steps: int, opd_steps: int) -> tuple[Path, Path]:
    import yaml

    from opd_megatron.tokenization.train_local import DEMO_CORPUS, write_hf_tokenizer_dir

    root.mkdir(parents=True, exist_ok=True)
    corpus = [*DEMO_CORPUS, *(f"reverse {w}={w[::-1]}" for w in ("abc", "hello", "xyz", "qwerty"))]
    tok_dir = write_hf_tokenizer_dir(root / "tokenizer", corpus=corpus)
    for name, seed in (("teacher", 1), ("student", 2)):
        build_model_dir(root / f"{name}_hf", tok_dir, SHAPES[name], seed)
    write_messages(root / "train.jsonl")
    write_messages(root / "eval.jsonl", n=100, split="eval")
    sft, opd = configs(root, sft_steps, opd_steps)
    (root / "sft.yaml").write_text(yaml.safe_dump(sft, sort_keys=False))
    (root / "opd.yaml").write_text(yaml.safe_dump(opd, sort_keys=False))
    return root / "sft.yaml", root / "opd.yaml"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/real_models")
    p.add_argument("--sft-steps", type=int, default=300)
    p.add_argument("--opd-steps", type=int, default=150)
    args = p.parse_args(argv)
    from opd_megatron.cli import main as cli

    sft, opd = build(Path(args.out), args.sft_steps, args.opd_steps)
    print(f"built tokenizer, teacher and student Hugging Face directories and messages data in {args.out}")
    code = cli(["sft", str(sft)])
    return code or cli(["run", str(opd)])


if __name__ == "__main__":
    sys.exit(main())
