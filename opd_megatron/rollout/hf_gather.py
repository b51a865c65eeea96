"""The live student's weights as Hugging Face tensors, gathered onto one rank (for an inference engine).

A vLLM engine holds the whole model in the HF layout (``model.layers.0.self_attn.q_proj.weight`` ...),
while the trainer holds TP shards of PP stages in Megatron's layout. :func:`gather_hf_state` turns the
second into the first, in memory, on the *engine rank*: TP rank 0 of the first pipeline stage.

Per parameter (the name mapping is the one of :mod:`opd_megatron.models.hf_convert`):

* replicated across TP (norms): taken from TP rank 0;
* row- or column-split (``o_proj`` / ``down_proj`` along dim 1): the TP shards are gathered and
  concatenated;
* fused QKV: every rank's shard is the fusion of its own slices of q, k and v (whole key/value groups
  are contiguous), so each rank splits its shard first, and the slices of q, k and v are concatenated
  separately;
* ``linear_fc1`` = ``[gate; up]`` on every rank: split first, then concatenate gates and ups;
* embedding / output layer: shards concatenated, padding rows dropped.

Pipeline stages: TP rank 0 of every later stage sends its tensors to the engine rank on the pipeline
group, one tensor at a time (the names go first, so the receiver allocates the right shapes). A tied
output layer on the last stage duplicates the embedding and is not sent twice.

Memory on the engine rank: one full copy of the model (the engine copies it into its own parameters
and the copy is dropped); on other ranks one gathered tensor at a time.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from opd_megatron.config import ModelConfig
from opd_megatron.distributed import ParallelGroups
from opd_megatron.models.hf_convert import split_qkv, tensor_links

__all__ = ["gather_hf_state", "is_engine_rank"]


def is_engine_rank(groups: ParallelGroups) -> bool:
    """True on the rank that holds its data-parallel replica's engine: TP rank 0 of pipeline stage 0."""
    return groups.tp_rank == 0 and groups.pp_rank == 0


def _gather_tp(piece: torch.Tensor, dim: int, groups: ParallelGroups) -> torch.Tensor | None:
    """Concatenate every TP rank's ``piece`` along ``dim`` on TP rank 0 (``None`` elsewhere)."""
    if groups.tp_size == 1:
        return piece
    piece = piece.contiguous()
    dst = dist.get_global_rank(groups.tp_group, 0)
    parts = [torch.empty_like(piece) for _ in range(groups.tp_size)] if groups.tp_rank == 0 else None
    dist.gather(piece, parts, dst=dst, group=groups.tp_group)
    return torch.cat(parts, dim=dim) if parts is not None else None


def _stage_tensors(model, cfg: ModelConfig, groups: ParallelGroups, dtype: torch.dtype):
    """Yield ``(hf_name, full tensor or None)`` for every HF tensor of this pipeline stage; the tensor
    is present on TP rank 0 only. Collective over the TP group."""
    real_vocab = model.real_vocab_size
    tp = groups.tp_size
    for link in tensor_links(model, cfg):
        local = link.param.detach()
        if link.kind == "qkv":
            pieces = split_qkv(local, cfg.num_attention_heads // tp, cfg.query_groups // tp)
        elif link.kind == "fc1":
            pieces = tuple(local.chunk(2, dim=0))
        else:
            pieces = (local,)
        for name, piece in zip(link.hf_names, pieces):
            if link.tp_dim is None:
                full = piece if groups.tp_rank == 0 else None
            else:
                full = _gather_tp(piece, link.tp_dim, groups)
            if full is not None and link.kind == "vocab":
                full = full[:real_vocab]
            yield name, (full.to(dtype).contiguous() if full is not None else None)


@torch.no_grad()
def gather_hf_state(
    model, cfg: ModelConfig, groups: ParallelGroups, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor] | None:
    """Every HF tensor of the model (this rank's stage and shard are its part), on the engine rank.

    Collective over the model-parallel ranks of this data-parallel replica: every TP rank of every
    pipeline stage calls it. Returns ``{hf_name: tensor}`` on TP rank 0 of pipeline stage 0, ``None``
    elsewhere. ``dtype`` defaults to the parameters' dtype.
    """
    dtype = dtype or next(model.parameters()).dtype
    local: dict[str, torch.Tensor] = {}
    for name, full in _stage_tensors(model, cfg, groups, dtype):
        if full is not None:
            local.setdefault(name, full)
    if groups.pp_size == 1:
        return local if groups.tp_rank == 0 else None
    if groups.tp_rank != 0:
        return None

    # TP rank 0 of each stage: exchange names and shapes, then stream later stages' tensors to stage 0.
    meta = [(n, tuple(t.shape)) for n, t in local.items()]
    every: list = [None] * groups.pp_size
    dist.all_gather_object(every, meta, group=groups.pp_group)
    seen = set(n for n, _ in every[0])
    root = dist.get_global_rank(groups.pp_group, 0)
    out = local if groups.pp_rank == 0 else None
    for stage in range(1, groups.pp_size):
        src = dist.get_global_rank(groups.pp_group, stage)
        for name, shape in every[stage]:
            if name in seen:  # the tied output layer of the last stage repeats the embedding
                continue
            seen.add(name)
            if groups.pp_rank == stage:
                dist.send(local[name], dst=root, group=groups.pp_group)
            elif groups.pp_rank == 0:
                buf = torch.empty(shape, dtype=dtype, device=groups.device)
                dist.recv(buf, src=src, group=groups.pp_group)
                out[name] = buf
    return out
