"""A lean decode path for Megatron-core GPTModel stages: the same maths, without the module machinery.

Decoding one token per row is latency-bound: at the sizes of a CPU run, or of a small model on any
device, the time of a decode step goes to Python and framework overhead rather than to FLOPs. A
Megatron-core ``TransformerLayer`` forward calls about 25 modules and autograd functions per token
(linear layers run through Megatron's gradient-accumulation autograd wrappers even under ``no_grad``,
process-group lookups, inference-context bookkeeping), which made the sampler slower per token than a
Hugging Face model's ``generate`` at small sizes.

:class:`LeanStage` runs the same stage on the model's own parameter tensors (read at every call, so
optimizer steps and weight loads are seen at once) with plain tensor ops: RMSNorm / LayerNorm, the
fused QKV projection split by query group exactly as Megatron lays it out, per-head QK norm, rotary
embedding (plain or YaRN, with YaRN's attention factor) indexed by cache position as Megatron's static
inference does, a KV cache in SDPA's layout
``[b, groups, s, d]`` written in place, the attention of :func:`~opd_megatron.models.attention.attend`,
row-parallel projections all-reduced over TP, and the (gated) MLP. It covers the dense Llama / Qwen2 /
Qwen3 layers this project builds with the local spec; :func:`lean_unsupported` names what it does not
cover (MoE layers, the Transformer Engine spec, sequence parallelism, ...), and those stages keep
Megatron's own forward. Tests check both paths give the same logits and tokens.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from opd_megatron.distributed import ParallelGroups
from opd_megatron.models.attention import SDPACoreAttention, attend

__all__ = ["LeanStage", "decode_linear", "lean_unsupported"]


# A decode step multiplies a few rows by each weight. On CPU, for a tall weight (more output than input
# features) that is not cache-resident, ``W @ x^T`` streams the weight 1.6-3.5x faster than ``x @ W^T``
# (measured on 2 threads: QKV and MLP-in projections of 1-3 MB with the cache flushed, output layers of
# 16k-131k rows, 8-32 rows of input); for square, wide or small weights it gains nothing or loses a little.
_TRANSPOSED_MIN_BYTES = 1 << 20  # more than this
_TRANSPOSED_MAX_ROWS = 32


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a decode step's few rows, in the faster form on CPU (the same
    product; the float rounding may differ in the last bits)."""
    out_features, in_features = weight.shape
    rows = x.numel() // in_features
    if (
        x.device.type != "cpu"
        or rows > _TRANSPOSED_MAX_ROWS
        or out_features < 2 * in_features
        or weight.numel() * weight.element_size() <= _TRANSPOSED_MIN_BYTES
    ):
        return F.linear(x, weight, bias)
    x_RI = x.reshape(rows, in_features)
    out = (weight @ x_RI.t()).t().contiguous().view(*x.shape[:-1], out_features)
    return out + bias if bias is not None else out


def _layer_unsupported(layer) -> str | None:
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.transformer_layer import TransformerLayer

    if type(layer) is not TransformerLayer:
        return f"layer type {type(layer).__name__}"
    attn = getattr(layer, "self_attention", None)
    if attn is None or not isinstance(getattr(attn, "core_attention", None), SDPACoreAttention):
        return "core attention other than the local SDPA one"
    if type(layer.mlp) is not MLP:
        return f"MLP type {type(layer.mlp).__name__} (mixture of experts)"
    for norm in (layer.input_layernorm, layer.pre_mlp_layernorm):
        if not isinstance(norm, (torch.nn.RMSNorm, torch.nn.LayerNorm)):
            return f"norm type {type(norm).__name__}"
    for norm in (attn.q_layernorm, attn.k_layernorm):
        if not (_is_identity(norm) or isinstance(norm, (torch.nn.RMSNorm, torch.nn.LayerNorm))):
            return f"QK norm type {type(norm).__name__}"
    if getattr(attn.config, "attention_output_gate", False):
        return "gated attention output"
    return None


def lean_unsupported(model, groups: ParallelGroups) -> str | None:
    """Why the lean path cannot run this GPTModel stage, or ``None`` when it can."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import YarnRotaryEmbedding

    c = model.config
    rope_types = (RotaryEmbedding, YarnRotaryEmbedding)
    checks = [
        (model.position_embedding_type in ("rope", "yarn"), "position embedding other than RoPE / YaRN"),
        (type(getattr(model, "rotary_pos_emb", None)) in rope_types, "a RoPE variant (mRoPE)"),
        (not c.sequence_parallel, "sequence parallelism"),
        (not c.rotary_interleaved and not c.multi_latent_attention, "interleaved RoPE / MLA"),
        (not c.apply_residual_connection_post_layernorm, "post-norm residuals"),
        (not c.fp32_residual_connection, "fp32 residual connections"),
        ((c.num_query_groups or c.num_attention_heads) >= groups.tp_size, "fewer KV heads than TP ranks"),
        (getattr(c, "activation_func_clamp_value", None) is None, "clamped GLU activations"),
        (not getattr(c, "glu_linear_offset", 0.0), "a GLU linear offset"),
        (getattr(model, "mtp_process", False) is False, "multi-token prediction"),
    ]
    for ok, what in checks:
        if not ok:
            return what
    for layer in model.decoder.layers:
        reason = _layer_unsupported(layer)
        if reason:
            return reason
    return None


def _is_identity(module) -> bool:
    from megatron.core.transformer.identity_op import IdentityOp

    return module is None or isinstance(module, IdentityOp)


def _norm(module, x: torch.Tensor) -> torch.Tensor:
    if module is None or not isinstance(module, (torch.nn.RMSNorm, torch.nn.LayerNorm)):
        return x  # Megatron's IdentityOp (no QK norm)
    if isinstance(module, torch.nn.RMSNorm):
        return F.rms_norm(x, module.normalized_shape, module.weight, module.eps)
    return F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as Megatron's non-fused path computes it: ``x cos + rotate_half(x) sin`` on the first
    ``rot_dim`` channels (``rotate_half([a, b]) = [-b, a]``), the rest passed through."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    a, b = torch.chunk(x_rot, 2, dim=-1)
    out = (x_rot * cos) + (torch.cat((-b, a), dim=-1) * sin)
    return torch.cat((out, x_pass), dim=-1) if x_pass.shape[-1] else out


def _rope_tables(model, positions: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and ``sin`` ``[positions, 1, d]`` as Megatron's attention applies them: YaRN's embedding
    also returns its attention factor, and the attention multiplies cos and sin by the factor it reads
    from the config (1 for plain RoPE) before casting to the model's dtype."""
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
        _yarn_get_concentration_factor_from_config,
    )

    freqs_S11D = model.rotary_pos_emb(positions)
    if isinstance(freqs_S11D, tuple):
        freqs_S11D = freqs_S11D[0]
    mscale = _yarn_get_concentration_factor_from_config(model.config)
    cos = (torch.cos(freqs_S11D) * mscale).to(dtype).view(positions, 1, -1)
    sin = (torch.sin(freqs_S11D) * mscale).to(dtype).view(positions, 1, -1)
    return cos, sin


class LeanStage:
    """One GPTModel stage decoding against its own KV cache through plain tensor ops.

    Call :meth:`prepare` before each batch, then :meth:`forward` with the left-padded prompt (prefill)
    and then with one new token per row at a time; non-first pipeline stages get their input through
    ``input_tensor``. Returns this stage's hidden states ``[s, b, h]`` (final-normed on the last stage),
    as Megatron's decoder does.
    """

    def __init__(self, model, groups: ParallelGroups):
        reason = lean_unsupported(model, groups)
        if reason is not None:
            raise ValueError(f"the lean decode path does not cover this model: {reason}")
        self.model = model
        c = model.config
        self.tp_group = groups.tp_group_or_none
        self.head_dim = c.kv_channels
        self.heads = c.num_attention_heads // groups.tp_size
        self.kv_groups = (c.num_query_groups or c.num_attention_heads) // groups.tp_size
        self.caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.offset = 0
        self.cos = self.sin = None

    def prepare(self, batch: int, seq_len: int) -> None:
        """Empty the cache for ``batch`` rows and up to ``seq_len`` positions (buffers grow, never shrink,
        so alternating shapes allocate once)."""
        self.offset = 0
        have = self.caches[0][0].shape if self.caches else (0, 0, 0, 0)
        if have[0] >= batch and have[2] >= seq_len and self.cos is not None:
            return
        rows, positions = max(batch, have[0]), max(seq_len, have[2])
        w = self.model.decoder.layers[0].self_attention.linear_qkv.weight
        shape = (rows, self.kv_groups, positions, self.head_dim)
        self.caches = [
            (
                torch.empty(shape, dtype=w.dtype, device=w.device),
                torch.empty(shape, dtype=w.dtype, device=w.device),
            )
            for _ in self.model.decoder.layers
        ]
        # Megatron's static inference indexes RoPE by cache position: rows [start, end) of these tables.
        self.cos, self.sin = _rope_tables(self.model, positions, w.dtype)

    def release(self) -> None:
        self.caches, self.cos, self.sin = [], None, None

    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_group is not None:
            dist.all_reduce(x, group=self.tp_group)
        return x

    def _attention(self, layer, x_BSH, index: int, mask) -> torch.Tensor:
        attn = layer.self_attention
        b, s, _ = x_BSH.shape
        d, per_group = self.head_dim, self.heads // self.kv_groups
        qkv = decode_linear(x_BSH, attn.linear_qkv.weight, attn.linear_qkv.bias)
        # Megatron's fused layout: per query group, its query heads, then one key and one value head.
        q, k, v = qkv.view(b, s, self.kv_groups, (per_group + 2) * d).split([per_group * d, d, d], dim=-1)
        q = q.reshape(b, s, self.heads, d)
        q, k = _norm(attn.q_layernorm, q), _norm(attn.k_layernorm, k)
        start, end = self.offset, self.offset + s
        cos, sin = self.cos[start:end], self.sin[start:end]
        q_BHSD = _rotate(q, cos, sin).transpose(1, 2)
        k_cache, v_cache = self.caches[index]
        k_cache[:b, :, start:end] = _rotate(k, cos, sin).transpose(1, 2)
        v_cache[:b, :, start:end] = v.transpose(1, 2)
        # Decoding runs in eval mode: no attention dropout (attend's default).
        out_BHSD = attend(
            q_BHSD, k_cache[:b, :, :end], v_cache[:b, :, :end], mask, attn.core_attention.softmax_scale
        )
        out = F.linear(out_BHSD.transpose(1, 2).reshape(b, s, -1), attn.linear_proj.weight)
        out = self._all_reduce(out)
        return out + attn.linear_proj.bias if attn.linear_proj.bias is not None else out

    def _mlp(self, mlp, x_BSH) -> torch.Tensor:
        y = decode_linear(x_BSH, mlp.linear_fc1.weight, mlp.linear_fc1.bias)
        act = mlp.config.activation_func
        if mlp.config.gated_linear_unit:
            y_glu, y_linear = torch.chunk(y, 2, dim=-1)
            y = act(y_glu) * y_linear
        else:
            y = act(y)
        out = self._all_reduce(F.linear(y, mlp.linear_fc2.weight))
        return out + mlp.linear_fc2.bias if mlp.linear_fc2.bias is not None else out

    @torch.no_grad()
    def forward(self, input_ids_BS, attention_mask=None, input_tensor=None) -> torch.Tensor:
        """Hidden states ``[s, b, h]`` of the new positions; writes their keys and values to the cache."""
        m = self.model
        if m.pre_process and self.tp_group is None and m.embedding.tokentype_embeddings is None:
            # One vocabulary shard, RoPE (no position table): the embedding is a row lookup.
            h_BSH = F.embedding(input_ids_BS, m.embedding.word_embeddings.weight)
        elif m.pre_process:
            h_BSH = m.embedding(input_ids=input_ids_BS, position_ids=None).transpose(0, 1)
        else:
            h_BSH = input_tensor.transpose(0, 1)
        for i, layer in enumerate(m.decoder.layers):
            h_BSH = h_BSH + self._attention(layer, _norm(layer.input_layernorm, h_BSH), i, attention_mask)
            h_BSH = h_BSH + self._mlp(layer.mlp, _norm(layer.pre_mlp_layernorm, h_BSH))
        self.offset += input_ids_BS.shape[1]
        if m.post_process and m.decoder.final_layernorm is not None:
            h_BSH = _norm(m.decoder.final_layernorm, h_BSH)
        return h_BSH.transpose(0, 1)
