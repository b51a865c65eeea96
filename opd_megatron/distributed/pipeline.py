"""Forward-only pipeline execution for inference (evaluation, sampling, teacher scoring).

Training uses Megatron-core's 1F1B schedules; inference needs something simpler: run stage by stage,
hand the hidden states ``[s, b, h]`` to the next stage with point-to-point sends on the pipeline group,
and return the last stage's output. Shapes are known from the inputs, so receivers allocate up front.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from opd_megatron.distributed.setup import ParallelGroups


def _peer(groups: ParallelGroups, pp_rank: int) -> int:
    return dist.get_global_rank(groups.pp_group, pp_rank)


def pipeline_forward(
    model,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    groups: ParallelGroups,
    attention_mask: torch.Tensor | None = None,
    hidden_dtype: torch.dtype = torch.float32,
    stage_fn=None,
    **forward_kwargs,
):
    """Run ``model`` over all pipeline stages. Returns the last stage's output there, ``None`` elsewhere.

    ``stage_fn(model, input_ids, position_ids, attention_mask)`` replaces ``model.forward`` per stage
    (e.g. to stop before the output layer); its non-last-stage output is what the next stage receives.
    """
    if stage_fn is None:

        def stage_fn(m, ids, pos, mask):
            return m(ids, pos, mask, **forward_kwargs)

    if groups.pp_size == 1:
        return stage_fn(model, input_ids, position_ids, attention_mask)
    b, s = input_ids.shape
    hidden_size = model.config.hidden_size
    if not groups.is_first_stage:
        recv = torch.empty(s, b, hidden_size, dtype=hidden_dtype, device=groups.device)
        dist.recv(recv, src=_peer(groups, groups.pp_rank - 1), group=groups.pp_group)
        model.set_input_tensor(recv)
    out = stage_fn(model, input_ids, position_ids, attention_mask)
    if not groups.is_last_stage:
        dist.send(
            out.contiguous().to(hidden_dtype), dst=_peer(groups, groups.pp_rank + 1), group=groups.pp_group
        )
        return None
    return out


def broadcast_from_last_stage(
    tensor: torch.Tensor | None, shape, dtype, groups: ParallelGroups
) -> torch.Tensor:
    """Give every pipeline stage the tensor the last stage computed (e.g. the sampled tokens)."""
    if groups.pp_size == 1:
        return tensor
    if not groups.is_last_stage:
        tensor = torch.empty(shape, dtype=dtype, device=groups.device)
    dist.broadcast(tensor, src=_peer(groups, groups.pp_size - 1), group=groups.pp_group)
    return tensor
