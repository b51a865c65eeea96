"""Layer-spec selection: Transformer Engine on CUDA when available, else local modules with SDPA."""

from __future__ import annotations

import importlib.util

import torch

from opd_megatron.config import ConfigError, ModelConfig


def transformer_engine_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def resolve_impl(cfg: ModelConfig) -> str:
    """Return ``"transformer_engine"`` or ``"local"`` for this machine, or raise a ConfigError."""
    te = transformer_engine_available()
    if cfg.fp8 is not None and not te:
        raise ConfigError(
            "model.fp8",
            f"FP8 ({cfg.fp8!r}) needs CUDA and Transformer Engine "
            f"(cuda={torch.cuda.is_available()}, transformer_engine installed="
            f"{importlib.util.find_spec('transformer_engine') is not None}); install the [gpu] extra "
            "on a GPU machine or set model.fp8=null",
        )
    if cfg.transformer_impl == "transformer_engine":
        if not te:
            raise ConfigError(
                "model.transformer_impl", "transformer_engine needs CUDA and the transformer-engine package"
            )
        return "transformer_engine"
    if cfg.transformer_impl == "local":
        return "local"
    return "transformer_engine" if te else "local"


def build_layer_spec(cfg: ModelConfig):
    """The per-layer ModuleSpec for a Llama-style GPTModel (RMSNorm is set on the TransformerConfig),
    with per-head QK norm (``cfg.qk_layernorm``) and MoE layers (``cfg.num_experts``) as configured."""
    from megatron.core.models.gpt import gpt_layer_specs

    if resolve_impl(cfg) == "transformer_engine":
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=cfg.num_experts, moe_grouped_gemm=False, qk_layernorm=cfg.qk_layernorm
        )
    from opd_megatron.models.attention import SDPACoreAttention

    # MoE layers: SequentialMLP experts (one SwiGLU per local expert) and a top-k router.
    spec = gpt_layer_specs.get_gpt_layer_local_spec(
        num_experts=cfg.num_experts,
        moe_grouped_gemm=False,
        qk_layernorm=cfg.qk_layernorm,
        normalization="RMSNorm",
    )
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    return spec
