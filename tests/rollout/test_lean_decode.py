"""The lean decode path against Megatron-core's forward, model family by model family (one process).

Both paths run the same left-padded prefill and then decode steps through a KV cache; their next-token
logits must agree at every step. TP=2 and PP=2 are covered by the sampler's multi-rank suite
(``test_sampler.py::test_lean_decode_path_equals_megatron_forward``).
"""

from __future__ import annotations

import pytest
import torch

VOCAB = 96
FAMILIES = {
    "llama": {},
    "gqa": {"num_query_groups": 2},
    "qwen2_qkv_bias": {"add_qkv_bias": True, "num_query_groups": 2},
    "qwen3_qk_norm_head_dim": {"qk_layernorm": True, "head_dim": 48, "num_query_groups": 2},
    "llama3_rope_scaling": {
        "rope_scaling": "llama3",
        "rope_scaling_factor": 8.0,
        "rope_original_max_position": 16,
        "rotary_base": 500000.0,
    },
    # Positions beyond the original context, and an attention factor other than 1 (0.1 ln 4 + 1).
    "yarn": {
        "rope_scaling": "yarn",
        "rope_scaling_factor": 4.0,
        "rope_original_max_position": 4,
        "rope_yarn_beta_fast": 8.0,
        "rope_yarn_beta_slow": 0.5,
    },
    "untied": {"tie_embeddings": False},
}


@pytest.fixture(scope="module")
def groups():
    from opd_megatron.config import ParallelConfig
    from opd_megatron.distributed import init_distributed

    return init_distributed(ParallelConfig(), 0)


def _model(groups, seed: int = 0, **fields):
    from opd_megatron.config import ModelConfig
    from opd_megatron.models.gpt import build_gpt_model

    cfg = ModelConfig(
        num_layers=2,
        hidden_size=128,
        num_attention_heads=4,
        max_sequence_length=64,
        init_method_std=0.1,
        **fields,
    )
    return build_gpt_model(cfg, groups, VOCAB, seed=seed).eval()


def _step_logits(model, groups, lean: bool, steps: int = 4) -> list[torch.Tensor]:
    """Next-token logits of a left-padded prefill and then ``steps`` decode steps (fixed inputs)."""
    from opd_megatron.rollout.greedy import left_pad, padding_attention_mask
    from opd_megatron.rollout.kv_cache import CachedStage

    stage = CachedStage(model, groups, lean=lean)
    assert (stage.lean is not None) == lean
    prompts = [[5, 9, 11, 3, 7, 8, 20], [4, 6], [30, 31, 32, 33]]
    ids_BS, pad_BS = left_pad(prompts, 0, torch.device("cpu"))
    b, s = ids_BS.shape
    stage.prepare(b, s + steps)
    key_pad = torch.zeros(b, 1, 1, s + steps, dtype=torch.bool)
    key_pad[:, 0, 0, :s] = pad_BS
    out = []
    with torch.no_grad():
        logits = stage.logits(ids_BS, torch.arange(s).expand(b, s), padding_attention_mask(pad_BS))
        out.append(logits)
        for t in range(steps):
            ids = torch.tensor([[40 + t], [50 + t], [60 + t]])
            logits = stage.logits(ids, torch.full((b, 1), s + t), key_pad[..., : s + t + 1])
            out.append(logits)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_lean_logits_equal_megatron_forward(groups, family):
    model = _model(groups, **FAMILIES[family])
    if family == "yarn":
        assert type(model.rotary_pos_emb).__name__ == "YarnRotaryEmbedding"
    lean, megatron = _step_logits(model, groups, True), _step_logits(model, groups, False)
    for t, (a, b) in enumerate(zip(lean, megatron)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"{family}: step {t}")


def test_lean_path_reads_the_live_parameters(groups):
    """An in-place weight change (an optimizer step, a weight load) shows in the next call."""
    model = _model(groups)
    stage_before = _step_logits(model, groups, True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    after_lean, after_megatron = _step_logits(model, groups, True), _step_logits(model, groups, False)
    assert not torch.allclose(stage_before[-1], after_lean[-1], atol=1e-3)
    torch.testing.assert_close(after_lean[-1], after_megatron[-1], atol=1e-5, rtol=1e-5)


def test_unsupported_models_keep_megatron_forward(groups):
    from opd_megatron.rollout.kv_cache import CachedStage
    from opd_megatron.rollout.lean_decode import LeanStage, lean_unsupported

    moe = _model(groups, num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=64)
    reason = lean_unsupported(moe, groups)
    assert reason is not None and "experts" in reason
    assert CachedStage(moe, groups).lean is None
    with pytest.raises(ValueError, match="lean decode path does not cover"):
        LeanStage(moe, groups)
    assert lean_unsupported(_model(groups), groups) is None


def test_prepare_grows_and_reuses_the_cache(groups):
    from opd_megatron.rollout.lean_decode import LeanStage

    stage = LeanStage(_model(groups), groups)
    stage.prepare(2, 10)
    first = stage.caches[0][0]
    stage.prepare(1, 5)  # smaller: same buffers
    assert stage.caches[0][0] is first and stage.offset == 0
    stage.prepare(4, 8)  # more rows: grows to cover both shapes
    assert stage.caches[0][0].shape[0] == 4 and stage.caches[0][0].shape[2] == 10


@pytest.mark.parametrize(
    "rows, out_features, in_features, bias",
    [(8, 4096, 128, False), (3, 2048, 384, True), (8, 384, 384, False), (64, 4096, 128, True)],
)
def test_decode_linear_is_the_same_product(rows, out_features, in_features, bias):
    """Whichever form it picks (``W @ x^T`` for a tall weight over 1 MiB and a few rows on CPU), the
    product equals ``F.linear``; for shapes it leaves alone, bit for bit."""
    from opd_megatron.rollout.lean_decode import decode_linear

    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 1, in_features, generator=g)
    w = torch.randn(out_features, in_features, generator=g)
    b = torch.randn(out_features, generator=g) if bias else None
    out, ref = decode_linear(x, w, b), torch.nn.functional.linear(x, w, b)
    assert out.shape == ref.shape == (rows, 1, out_features) and out.is_contiguous()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-5)
    transposed = rows <= 32 and out_features >= 2 * in_features and w.numel() * 4 > 1 << 20
    if not transposed:
        assert torch.equal(out, ref)
