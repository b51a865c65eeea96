"""Hugging Face model directories wherever a run accepts a checkpoint.

A teacher's ``checkpoint`` or the student's ``train.init_checkpoint`` may be a Hugging Face directory
(``config.json`` + safetensors + tokenizer files). Each is converted once into
``train.output_dir/hf_cache/<content hash>/`` (collective; reused when the run resumes or another run of
the same output directory points at the same files), and the run then loads the converted checkpoint.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from opd_megatron.config import RunConfig
from opd_megatron.distributed import ParallelGroups
from opd_megatron.models.hf_dir import Materialised, is_hf_dir, materialise


def materialise_sources(cfg: RunConfig, groups: ParallelGroups) -> tuple[RunConfig, Materialised | None]:
    """``cfg`` with every Hugging Face checkpoint replaced by its converted copy, and the student's
    conversion (None when ``train.init_checkpoint`` is not a Hugging Face directory)."""
    cache = Path(cfg.train.output_dir) / "hf_cache"
    teachers = []
    for i, t in enumerate(cfg.teachers):
        if t.checkpoint and is_hf_dir(t.checkpoint) and t.placement != "vllm":  # vLLM reads HF itself
            hf = materialise(t.checkpoint, groups, cache, where=f"teachers[{i}].checkpoint")
            t = replace(t, checkpoint=str(hf.checkpoint))
        teachers.append(t)
    init, train = None, cfg.train
    if train.init_checkpoint and is_hf_dir(train.init_checkpoint):
        init = materialise(train.init_checkpoint, groups, cache, where="train.init_checkpoint")
        train = replace(train, init_checkpoint=str(init.checkpoint))
    return replace(cfg, teachers=teachers, train=train), init
