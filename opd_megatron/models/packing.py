"""Packed sequences (THD): a micro-batch's rows laid end to end, no padding, for the decoder forward.

A padded ``[B, S]`` micro-batch of rollouts of mixed lengths spends the decoder's compute on padding.
Packed, the rows become one sequence of ``T = sum_b len_b`` tokens with cumulative boundaries
``cu_seqlens = [0, len_0, len_0 + len_1, ...]``; Megatron-core's attention then restricts each token to
its own row (``PackedSeqParams``, ``qkv_format="thd"``) and rotary positions restart at every row.
Only the decoder runs packed: :func:`unpack_hidden` puts its output back on the padded ``[S, B, H]``
grid (zeros at padding), so the losses, their masks and their normalisation are exactly those of the
padded batch.

Attention: Transformer Engine's kernels take THD natively (GPU); the project's local
``SDPACoreAttention`` runs one causal attention per row (CPU and GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.packed_seq_params import PackedSeqParams

__all__ = ["Packed", "pack_rows", "unpack_hidden"]


@dataclass
class Packed:
    tokens_1T: torch.Tensor
    position_ids_1T: torch.Tensor
    params: PackedSeqParams
    index_T: torch.Tensor
    """Where packed token ``t`` sits on the padded grid, as a flat index ``s * B + b`` into ``[S, B]``."""
    rows: int
    width: int

    @property
    def padding_fraction(self) -> float:
        """Share of the padded grid the packed forward does not compute."""
        return 1.0 - self.tokens_1T.shape[1] / max(1, self.rows * self.width)


def pack_rows(tokens_BS: torch.Tensor, lengths_B: list[int]) -> Packed:
    """Pack the first ``lengths_B[b]`` tokens of each right-padded row ``b`` (rows of length 0 are left
    out; the output keeps zeros for them)."""
    B, S = tokens_BS.shape
    if len(lengths_B) != B:
        raise ValueError(f"{len(lengths_B)} lengths for {B} rows")
    if any(n < 0 or n > S for n in lengths_B):
        raise ValueError(f"row lengths must lie in [0, {S}], got {lengths_B}")
    dev = tokens_BS.device
    kept = [(b, n) for b, n in enumerate(lengths_B) if n > 0]
    if not kept:
        raise ValueError("nothing to pack: every row is empty")
    tokens_T = torch.cat([tokens_BS[b, :n] for b, n in kept])
    positions_T = torch.cat([torch.arange(n, device=dev) for _, n in kept])
    index_T = torch.cat([torch.arange(n, device=dev) * B + b for b, n in kept])
    cu = torch.zeros(len(kept) + 1, dtype=torch.int32, device=dev)
    cu[1:] = torch.cumsum(torch.tensor([n for _, n in kept], dtype=torch.int32, device=dev), 0)
    longest = max(n for _, n in kept)
    params = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=longest,
        max_seqlen_kv=longest,
    )
    return Packed(tokens_T[None], positions_T[None], params, index_T, B, S)


def unpack_hidden(hidden_T1H: torch.Tensor, packed: Packed) -> torch.Tensor:
    """The packed decoder output ``[T, 1, H]`` back on the padded grid ``[S, B, H]`` (zeros at padding;
    differentiable)."""
    H = hidden_T1H.shape[-1]
    out = hidden_T1H.new_zeros(packed.width * packed.rows, H)
    out = out.index_copy(0, packed.index_T, hidden_T1H.reshape(-1, H))
    return out.view(packed.width, packed.rows, H)
