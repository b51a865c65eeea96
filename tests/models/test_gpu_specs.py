"""GPU-only checks (marker ``gpu``): the Transformer Engine spec and FP8.

Skipped without CUDA; the TE tests also skip when transformer-engine is not installed.
"""

from __future__ import annotations

import pytest
import torch

from tests.multirank import run_ranks

pytestmark = pytest.mark.gpu

# Local spec keeps the norms as modules; the TE spec fuses them into the following linear layer.
_LOCAL_TO_TE = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


def _te_matches_local(rank):
    from opd_megatron.config import ModelConfig, ParallelConfig
    from opd_megatron.distributed import init_distributed
    from opd_megatron.models.gpt import build_gpt_model

    groups = init_distributed(ParallelConfig())
    base = dict(num_layers=2, hidden_size=128, num_attention_heads=4, num_query_groups=2, params_dtype="bf16")
    local = build_gpt_model(ModelConfig(**base, transformer_impl="local"), groups, 100, seed=0).eval()
    te = build_gpt_model(
        ModelConfig(**base, transformer_impl="transformer_engine"), groups, 100, seed=1
    ).eval()
    te_state = te.state_dict()
    for name, tensor in local.state_dict().items():
        if "_extra_state" in name:
            continue
        target = name
        for src, dst in _LOCAL_TO_TE.items():
            target = target.replace(src, dst)
        te_state[target].copy_(tensor)
    tokens = torch.randint(0, 100, (2, 32), device="cuda")
    pos = torch.arange(32, device="cuda").expand(2, 32)
    with torch.no_grad():
        a = local(tokens, pos, None).float()
        b = te(tokens, pos, None).float()
    return (a - b).abs().max().item(), a.abs().max().item()


def _fp8_step(rank):
    from opd_megatron.config import ModelConfig, ParallelConfig
    from opd_megatron.distributed import init_distributed
    from opd_megatron.models.gpt import build_gpt_model

    groups = init_distributed(ParallelConfig())
    cfg = ModelConfig(num_layers=2, hidden_size=256, num_attention_heads=4, params_dtype="bf16", fp8="hybrid")
    model = build_gpt_model(cfg, groups, 256, seed=0)
    tokens = torch.randint(0, 256, (4, 64), device="cuda")
    pos = torch.arange(64, device="cuda").expand(4, 64)
    loss = model(tokens, pos, None, labels=tokens).float().mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return loss.item(), all(torch.isfinite(g).all().item() for g in grads), len(grads)


def test_transformer_engine_spec_matches_local_spec():
    pytest.importorskip("transformer_engine")
    diff, scale = run_ranks(_te_matches_local, 1)[0]
    assert diff <= 2e-2 * max(scale, 1.0)  # bf16 tolerance


def test_fp8_forward_backward_runs():
    pytest.importorskip("transformer_engine")
    loss, finite, n_grads = run_ranks(_fp8_step, 1)[0]
    assert finite and n_grads > 0 and loss == loss
