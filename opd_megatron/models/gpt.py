"""Build Llama-style Megatron-core GPTModels from a :class:`ModelConfig`.

Llama style: RMSNorm, SwiGLU MLP without biases, rotary position embeddings (optionally scaled, see
:mod:`opd_megatron.models.rope`), grouped-query attention, optionally tied embeddings, (Qwen2) a bias on
the QKV projection, (Qwen3) per-head query/key RMSNorm and a head size other than ``hidden / heads``,
and (Qwen3-MoE) a routed mixture of SwiGLU experts in every layer, split over the expert-parallel group.

Vocabulary rows. ``model.real_vocab_size`` is the vocabulary the tokenizer can produce; the losses and
the sampler take it as ``vocab_size`` and give every row at or beyond it neither probability nor loss
mass. Real checkpoints often carry more embedding rows than their tokenizer has tokens (Qwen2/Qwen3:
151,936 rows for 151,665 tokens; ``model.vocab_size`` is the checkpoint's row count). A model built for
training or scoring holds only the rows its tokenizer can reach, padded to a TP-divisible size: loading
a checkpoint with more rows drops the unused ones (dist-checkpointing stores the embedding with
``allow_shape_mismatch``), so a student and a teacher of one family that share a tokenizer but differ in
row count get identical vocabulary shards at any TP. Conversion builds with ``all_rows=True`` and keeps
every row, so an import followed by an export gives back identical tensors.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from opd_megatron.config import ConfigError, ModelConfig
from opd_megatron.distributed import ParallelGroups
from opd_megatron.models.rope import rope_inv_freq
from opd_megatron.models.specs import build_layer_spec, resolve_impl

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def padded_vocab_size(vocab_size: int, divisible_by: int, tp_size: int) -> int:
    """Smallest multiple of ``lcm(divisible_by, tp_size)`` that holds ``vocab_size`` entries.

    Unlike padding to ``divisible_by * tp_size``, the padded size does not change with TP whenever
    ``tp_size`` divides ``divisible_by`` (TP = 1, 2, 4, 8, 16 for the default 16), so a checkpoint saved at
    one TP loads at another: the embedding keeps its shape.
    """
    multiple = math.lcm(divisible_by, tp_size)
    return -(-vocab_size // multiple) * multiple


def recompute_kwargs(recompute: str) -> dict:
    """TransformerConfig fields of ``train.recompute``: ``selective`` recomputes core attention (the
    ``[b, heads, s, s]`` scores dominate activation memory at long sequences), ``full`` recomputes every
    layer from its input (one checkpointed layer at a time), keeping only layer inputs."""
    if recompute == "selective":
        return {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    if recompute == "full":
        return {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    return {}


def build_transformer_config(
    cfg: ModelConfig, groups: ParallelGroups, params_dtype: str | None = None, recompute: str = "none"
):
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = _DTYPES[params_dtype or cfg.params_dtype]
    cuda = torch.cuda.is_available()
    kwargs = recompute_kwargs(recompute)
    if cfg.fp8 is not None:
        kwargs.update(fp8=cfg.fp8, fp8_recipe="delayed")
    if cfg.num_experts is not None:
        kwargs.update(
            num_moe_experts=cfg.num_experts,
            moe_router_topk=cfg.moe_router_topk,
            moe_ffn_hidden_size=cfg.expert_ffn_size,
            # Softmax over all experts, then top-k (probabilities not renormalised) is Megatron's
            # pre-softmax; top-k logits, then softmax over the k, equals renormalised top-k probabilities.
            moe_router_pre_softmax=not cfg.moe_norm_topk_prob,
            moe_router_score_function="softmax",
            moe_router_load_balancing_type="aux_loss" if cfg.moe_aux_loss_coeff > 0 else "none",
            moe_aux_loss_coeff=cfg.moe_aux_loss_coeff,
            # all-to-all dispatch lets the ranks of an EP group route different numbers of tokens (data-
            # parallel ranks hold different batches); allgather would need equal counts. No grouped GEMM
            # without its kernels.
            moe_token_dispatcher_type="alltoall",
            moe_grouped_gemm=False,
            expert_model_parallel_size=groups.ep_size,
        )
    elif groups.ep_size > 1:
        raise ConfigError(
            "parallel.expert_model_parallel_size",
            f"EP={groups.ep_size} needs a mixture-of-experts model (model.num_experts is unset)",
        )
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.query_groups,
        ffn_hidden_size=cfg.ffn_size,
        kv_channels=cfg.kv_channels,
        qk_layernorm=cfg.qk_layernorm,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=cfg.add_qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.init_method_std,
        tensor_model_parallel_size=groups.tp_size,
        pipeline_model_parallel_size=groups.pp_size,
        sequence_parallel=False,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=not cuda,
        # The loss function normalises by the global token count itself (see train.loop).
        calculate_per_token_loss=True,
        # Fusions need CUDA extensions; the TE spec brings its own.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        **kwargs,
    )


def set_yarn_fields(tconfig, cfg: ModelConfig) -> None:
    """The ``yarn_*`` attributes Megatron-core's GPTModel reads to build its ``YarnRotaryEmbedding`` and
    that its self-attention reads to multiply cos/sin by YaRN's attention factor (TransformerConfig has
    them only in its MLA subclass). The factor follows transformers' rule: ``mscale`` and
    ``mscale_all_dim`` count only when both are non-zero, else ``m(factor, 1)``, which is Megatron's
    result for ``None``."""
    both = bool(cfg.rope_yarn_mscale and cfg.rope_yarn_mscale_all_dim)
    tconfig.yarn_rotary_scaling_factor = cfg.rope_scaling_factor
    tconfig.yarn_original_max_position_embeddings = cfg.rope_original_max_position
    tconfig.yarn_beta_fast = cfg.rope_yarn_beta_fast
    tconfig.yarn_beta_slow = cfg.rope_yarn_beta_slow
    tconfig.yarn_mscale = cfg.rope_yarn_mscale if both else None
    tconfig.yarn_mscale_all_dim = cfg.rope_yarn_mscale_all_dim if both else None
    tconfig.yarn_correction_range_round_to_int = True


def build_gpt_model(
    cfg: ModelConfig,
    groups: ParallelGroups,
    vocab_size: int | None = None,
    *,
    seed: int | None = None,
    frozen: bool = False,
    params_dtype: str | None = None,
    initialize: bool = True,
    all_rows: bool = False,
    recompute: str = "none",
):
    """Build this rank's GPTModel stage.

    ``vocab_size`` is the real vocabulary (the tokenizer's size); ``None`` takes ``cfg.vocab_size``. When
    ``cfg.vocab_size`` (the checkpoint's embedding rows) is larger, only the first ``vocab_size`` rows are
    built unless ``all_rows`` (conversion) keeps them all (see the module docstring). The embedding is
    padded to a TP-divisible size; the real size is kept as ``model.real_vocab_size``.
    ``frozen`` builds a teacher: no gradients, eval mode (``params_dtype="bf16"`` halves its memory).
    ``initialize=False`` skips the random init (parameters hold arbitrary values) for callers that
    overwrite every parameter: init costs time and an fp32 copy of each weight at once.
    ``recompute`` is ``train.recompute`` (a student's activation recomputation).
    """
    from megatron.core.models.gpt.gpt_model import GPTModel

    real_vocab = vocab_size if vocab_size is not None else cfg.vocab_size
    if real_vocab is None:
        raise ValueError("the vocabulary size must come from model.vocab_size or the tokenizer")
    if cfg.vocab_size is not None and real_vocab > cfg.vocab_size:
        raise ConfigError(
            "model.vocab_size",
            f"the tokenizer has {real_vocab} tokens but the model only {cfg.vocab_size} embedding rows",
        )
    rows = (cfg.vocab_size or real_vocab) if all_rows else real_vocab
    resolve_impl(cfg)  # raises a ConfigError for FP8 without TE/CUDA before anything is allocated
    tconfig = build_transformer_config(cfg, groups, params_dtype, recompute)
    tconfig.perform_initialization = initialize
    if seed is not None:
        torch.manual_seed(seed)
    padded = padded_vocab_size(rows, cfg.make_vocab_size_divisible_by, groups.tp_size)
    yarn = cfg.rope_scaling == "yarn"
    if yarn:
        set_yarn_fields(tconfig, cfg)
    ctx = torch.device("cuda") if torch.cuda.is_available() else nullcontext()
    with ctx:
        model = GPTModel(
            config=tconfig,
            transformer_layer_spec=build_layer_spec(cfg),
            vocab_size=padded,
            max_sequence_length=cfg.max_sequence_length,
            pre_process=groups.is_first_stage,
            post_process=groups.is_last_stage,
            parallel_output=True,
            share_embeddings_and_output_weights=cfg.tie_embeddings,
            position_embedding_type="yarn" if yarn else "rope",
            rotary_base=int(cfg.rotary_base),
            pg_collection=groups.pg_collection,
        )
    if cfg.rope_scaling in ("linear", "llama3"):
        _install_inv_freq(model, cfg)
    model.real_vocab_size = real_vocab
    model.padded_vocab_size = padded
    if frozen:
        freeze(model)
    return model


def _install_inv_freq(model, cfg: ModelConfig) -> None:
    """Megatron's own Llama-3 scaling hard-codes the band edges; install the exact frequencies instead
    (before any forward: the model caches cos/sin per sequence length)."""
    inv_freq = model.rotary_pos_emb.inv_freq
    model.rotary_pos_emb.inv_freq = rope_inv_freq(cfg).to(inv_freq.device, inv_freq.dtype)


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Teacher mode: no parameter takes a gradient and dropout is off."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return model


def output_weight(model) -> torch.Tensor:
    """This rank's output-layer shard ``[V/tp, H]`` (the embedding when tied)."""
    if model.share_embeddings_and_output_weights:
        return model.shared_embedding_or_output_weight()
    return model.output_layer.weight


def vocab_shard_range(model, tp_rank: int, tp_size: int) -> tuple[int, int]:
    """Global vocabulary indices ``[start, end)`` held by this TP rank."""
    per_rank = model.padded_vocab_size // tp_size
    return tp_rank * per_rank, (tp_rank + 1) * per_rank


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
