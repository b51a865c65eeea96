"""Token choice over a vocabulary split across tensor-parallel ranks, without gathering ``[*, V]``."""

from __future__ import annotations

import torch
import torch.distributed as dist


def mask_padded_vocab(logits_shard: torch.Tensor, shard_start: int, real_vocab: int) -> torch.Tensor:
    """Set logits of padding rows (global index >= real_vocab) to -inf; they must never be chosen."""
    shard = logits_shard.shape[-1]
    if shard_start + shard <= real_vocab:
        return logits_shard
    keep = shard_start + torch.arange(shard, device=logits_shard.device) < real_vocab
    return logits_shard.masked_fill(~keep, float("-inf"))


def vocab_parallel_argmax(
    logits_shard_BV: torch.Tensor, shard_start: int, tp_group: dist.ProcessGroup | None, tp_size: int
) -> torch.Tensor:
    """Global argmax ``[B]`` from per-rank shards ``[B, V/tp]``: local max, then an all-gather of
    ``B`` (value, index) pairs per rank. Ties resolve to the lowest global index, as ``torch.argmax``."""
    local_val_B, local_idx_B = logits_shard_BV.max(dim=-1)
    global_idx_B = local_idx_B + shard_start
    if tp_size == 1:
        return global_idx_B
    vals = [torch.empty_like(local_val_B) for _ in range(tp_size)]
    idxs = [torch.empty_like(global_idx_B) for _ in range(tp_size)]
    dist.all_gather(vals, local_val_B.contiguous(), group=tp_group)
    dist.all_gather(idxs, global_idx_B.contiguous(), group=tp_group)
    vals_RB, idxs_RB = torch.stack(vals), torch.stack(idxs)  # [tp, B]
    best_B = vals_RB.argmax(dim=0)  # first rank holding the max has the lowest index
    return idxs_RB.gather(0, best_B.unsqueeze(0)).squeeze(0)
