"""GPU-only (marker ``gpu``): a co-located teacher offloaded to host memory while idle scores exactly like
one that stays on the GPU, and sits in host memory between calls."""

from __future__ import annotations

import pytest

from tests.multirank import run_ranks

pytestmark = pytest.mark.gpu


def _offload(rank):
    import torch

    from opd_megatron.config import ModelConfig, ParallelConfig
    from opd_megatron.data.jsonl import PromptRow
    from opd_megatron.distributed import init_distributed
    from opd_megatron.models.gpt import build_gpt_model
    from opd_megatron.teachers.colocated import MegatronTeacher

    groups = init_distributed(ParallelConfig())
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, max_sequence_length=32)
    resident = build_gpt_model(cfg, groups, 64, seed=1, frozen=True)
    offloaded = build_gpt_model(cfg, groups, 64, seed=1, frozen=True)
    a = MegatronTeacher("resident", resident, groups, 0)
    b = MegatronTeacher("offloaded", offloaded, groups, 0, offload_when_idle=True)
    idle_before = {p.device.type for p in offloaded.parameters()}
    rows = [PromptRow("x", "d")] * 2
    prompts, comps = [[1, 5, 6], [1, 7]], [[8, 9, 2], [10, 2]]
    ta, tb = a.score(rows, prompts, comps), b.score(rows, prompts, comps)
    idle_after = {p.device.type for p in offloaded.parameters()}
    same = torch.equal(ta.logits_NV(), tb.logits_NV())
    return idle_before, idle_after, tb.weight_VH.device.type, same


def test_offloaded_teacher_scores_like_a_resident_one():
    idle_before, idle_after, weight_device, same = run_ranks(_offload, 1, timeout=300)[0]
    assert idle_before == idle_after == {"cpu"}
    assert weight_device == "cuda" and same
