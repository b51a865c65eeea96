"""Tiny random Qwen3 models saved as Hugging Face directories (config.json, safetensors, a byte-level BPE
tokenizer trained here with a ChatML thinking template), for tests that hand an HF directory to the
command line or the teacher server."""

from __future__ import annotations

import json
from pathlib import Path

from opd_megatron.config import TokenizerConfig
from opd_megatron.tokenization import load_tokenizer
from opd_megatron.tokenization.train_local import write_hf_tokenizer_dir


def tiny_qwen3_dir(path: Path, seed: int = 0, layers: int = 2, extra_rows: int = 0, **config) -> Path:
    """A random Qwen3 (hidden 32, 4 heads of 8, 2 key/value heads, tied) with its tokenizer next to it;
    ``config`` overrides Qwen3Config fields. The embedding has ``extra_rows`` rows more than the tokenizer
    has ids (as Qwen checkpoints do)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    path = Path(path)
    write_hf_tokenizer_dir(path)
    vocab = load_tokenizer(TokenizerConfig(kind="hf", path=str(path))).vocab_size + extra_rows
    torch.manual_seed(seed)
    kw = dict(
        vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
        tie_word_embeddings=True, rms_norm_eps=1e-6,
    )  # fmt: skip
    Qwen3ForCausalLM(Qwen3Config(**{**kw, **config})).eval().save_pretrained(path)
    return path


def break_hf_dir(src: Path, dst: Path, how: str) -> Path:
    """A copy of ``src`` broken one way: ``architecture`` (a GPT-2 config.json), ``tokenizer`` (no
    tokenizer.json), ``weights`` (config.json names one layer more than the safetensors hold)."""
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    if how == "architecture":
        cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    elif how == "weights":
        cfg["num_hidden_layers"] += 1
    elif how == "tokenizer":
        (dst / "tokenizer.json").unlink()
    else:
        raise ValueError(f"unknown breakage {how!r}")
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst
