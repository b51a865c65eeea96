"""Core attention on ``torch.nn.functional.scaled_dot_product_attention`` for the local layer spec.

Megatron-core's local ``DotProductAttention`` allocates a buffer with ``torch.cuda.current_device()``;
this module replaces it in the spec (``submodules.core_attention``) so the same GPTModel runs on CPU and
GPU. SDPA dispatches to flash / memory-efficient kernels on CUDA and a fused C++ kernel on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule


def attend(q_BHSD, k_BHSD, v_BHSD, attention_mask=None, scale=None, dropout: float = 0.0) -> torch.Tensor:
    """Causal (optionally padded) attention of the ``sq`` queries, the last ``sq`` of the ``sk`` key
    positions, in SDPA's layout ``[b, heads or groups, s, d]``; ``attention_mask`` is Megatron's boolean
    ``[b or 1, 1, sq or 1, sk]`` with True meaning "do not attend". Returns ``[b, heads, sq, d]``."""
    heads, groups = q_BHSD.shape[1], k_BHSD.shape[1]
    sq, sk = q_BHSD.shape[2], k_BHSD.shape[2]
    # GQA: each key/value head serves heads // groups query heads (SDPA broadcasts them itself).
    gqa = {"enable_gqa": True} if groups != heads else {}
    if attention_mask is None and sq == sk:
        return F.scaled_dot_product_attention(
            q_BHSD, k_BHSD, v_BHSD, is_causal=True, dropout_p=dropout, scale=scale, **gqa
        )
    if sq == 1:  # one decode step: the last query sees every cached key but the masked ones
        allowed = None if attention_mask is None else ~attention_mask
        return F.scaled_dot_product_attention(
            q_BHSD, k_BHSD, v_BHSD, attn_mask=allowed, dropout_p=dropout, scale=scale, **gqa
        )
    # Queries are the last sq positions of the sk keys (decode against a cache): the causal mask is
    # aligned bottom-right, which is_causal=True (top-left) would get wrong.
    allowed_SK = torch.ones(sq, sk, dtype=torch.bool, device=q_BHSD.device).tril(diagonal=sk - sq)
    if attention_mask is not None:
        allowed_SK = allowed_SK & ~attention_mask
    return F.scaled_dot_product_attention(
        q_BHSD, k_BHSD, v_BHSD, attn_mask=allowed_SK, dropout_p=dropout, scale=scale, **gqa
    )


class SDPACoreAttention(MegatronModule):
    """Causal (optionally padded) multi-head / grouped-query attention.

    Inputs follow Megatron's layout: query ``[sq, b, heads, d]``, key/value ``[sk, b, groups, d]``
    (``sk >= sq`` when decoding against a KV cache). ``attention_mask``, when given, is Megatron's
    boolean mask ``[b or 1, 1, sq or 1, sk]`` with True meaning "do not attend"; it is combined with the
    causal mask. Packed sequences (``packed_seq_params.qkv_format == "thd"``): query ``[T, heads, d]``,
    key/value ``[T, groups, d]``, rows delimited by ``cu_seqlens``; each row attends causally to itself.
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type, softmax_scale=None, **kwargs):
        super().__init__(config=config)
        self.softmax_scale = softmax_scale
        self.dropout_p = config.attention_dropout

    def forward(
        self,
        query,
        key,
        value,
        attention_mask,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        if packed_seq_params is not None:
            return self._packed(query, key, value, packed_seq_params)
        q_BHSD, k_BHSD, v_BHSD = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        dropout = self.dropout_p if self.training else 0.0
        out_BHSD = attend(q_BHSD, k_BHSD, v_BHSD, attention_mask, self.softmax_scale, dropout)
        # [b, h, sq, d] -> [sq, b, h*d], the layout Megatron's output projection expects.
        return out_BHSD.permute(2, 0, 1, 3).reshape(out_BHSD.shape[2], out_BHSD.shape[0], -1)

    def _packed(self, query_THD, key_TGD, value_TGD, params) -> torch.Tensor:
        """THD: one causal attention per packed row (``cu_seqlens_q`` boundaries); ``[T, heads * d]``."""
        if params.qkv_format != "thd":
            raise NotImplementedError(
                f"packed sequences in {params.qkv_format!r} format; only 'thd' is supported"
            )
        cu_q, cu_kv = params.cu_seqlens_q.tolist(), params.cu_seqlens_kv.tolist()
        if cu_q != cu_kv:
            raise NotImplementedError("packed self-attention needs equal query and key boundaries")
        heads, groups = query_THD.shape[1], key_TGD.shape[1]
        gqa = {"enable_gqa": True} if groups != heads else {}
        dropout = self.dropout_p if self.training else 0.0
        outs = []
        for a, b in zip(cu_q[:-1], cu_q[1:]):
            q, k, v = (x[a:b].transpose(0, 1)[None] for x in (query_THD, key_TGD, value_TGD))  # [1, h, n, d]
            o = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=dropout, scale=self.softmax_scale, **gqa
            )
            outs.append(o[0].transpose(0, 1))  # [n, h, d]
        return torch.cat(outs).reshape(query_THD.shape[0], -1)
