"""One optimizer step over micro-batches through Megatron-core's pipeline schedules.

The same function serves SFT and OPD: the caller supplies micro-batches and a ``loss_fn`` that maps the
last stage's output to a summed loss. The step divides by the global token count itself, so the result is
correct under gradient accumulation and data parallelism (DP gradients are summed, see
``distributed.grads``). A non-finite loss or gradient norm on any rank skips the optimizer step on all
ranks and leaves the parameters untouched.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from opd_megatron.distributed import ParallelGroups
from opd_megatron.distributed.grads import all_finite, clip_grads, dp_sum_, grad_norm, sync_grads
from opd_megatron.distributed.pipeline import broadcast_from_last_stage
from opd_megatron.models.hidden import decoder_hidden_states
from opd_megatron.models.packing import pack_rows, unpack_hidden
from opd_megatron.train.batch import MicroBatch


def student_hidden(model, mb: MicroBatch):
    """The decoder output `[s, b, h]` of the micro-batch's padded grid (positions 0..s-1 in every row)."""
    pos_BS = torch.arange(mb.tokens.shape[1], device=mb.tokens.device).expand_as(mb.tokens)
    return decoder_hidden_states(model, mb.tokens, pos_BS)


def packed_student_hidden(model, mb: MicroBatch):
    """:func:`student_hidden` computed on the micro-batch's rows packed end to end (THD), returned on
    the padded grid: the same values at every real token, zeros at padding."""
    lengths = [len(p) + len(c) for p, c in zip(mb.prompts, mb.comps)]
    packed = pack_rows(mb.tokens, lengths + [0] * (mb.tokens.shape[0] - len(lengths)))
    hidden_T1H = decoder_hidden_states(
        model, packed.tokens_1T, packed.position_ids_1T, packed_seq_params=packed.params
    )
    return unpack_hidden(hidden_T1H, packed)


def forward_backward(
    model,
    microbatches: list[MicroBatch],
    forward_fn: Callable[[object, MicroBatch], torch.Tensor],
    loss_fn: Callable[[torch.Tensor, MicroBatch], tuple[torch.Tensor, dict]],
    groups: ParallelGroups,
    global_tokens: int,
    metric_keys: tuple[str, ...] = (),
    forward_only: bool = False,
) -> tuple[float, dict[str, float]]:
    """Run all micro-batches; returns (loss summed over tokens / global_tokens, summed metrics).

    ``forward_fn(model, mb)`` returns the stage output; on the last stage ``loss_fn(output, mb)`` returns
    ``(loss_sum, metrics)``: the loss summed over the micro-batch's tokens and detached sums for each of
    ``metric_keys`` (token counts, KL sums, ...). Both come back summed over micro-batches and DP ranks,
    on every rank (the last pipeline stage broadcasts them).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    norm = float(max(global_tokens, 1))
    keys = ("loss_sum", *metric_keys)

    def step_fn(data_iter, model_chunk):
        mb = next(data_iter)
        out = forward_fn(model_chunk, mb)

        def loss_func(output):
            loss_sum, metrics = loss_fn(output, mb)
            metrics = dict(metrics, loss_sum=loss_sum)
            packed = torch.stack([torch.as_tensor(metrics[k]).detach().double().reshape(()) for k in keys])
            return loss_sum / norm, torch.tensor(1, dtype=torch.int), packed

        return out, loss_func

    fb = get_forward_backward_func(pp_size=groups.pp_size)
    p2p = None
    if groups.pp_size > 1:  # explicit groups need an explicit communicator on the pipelined schedule
        from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

        p2p = P2PCommunicator(pp_group=groups.pp_group, config=model.config)
    results = fb(
        forward_step_func=step_fn,
        data_iterator=iter(microbatches),
        model=[model],
        num_microbatches=len(microbatches),
        seq_length=microbatches[0].tokens.shape[1],
        micro_batch_size=microbatches[0].tokens.shape[0],
        forward_only=forward_only,
        pg_collection=groups.pg_collection,
        p2p_communicator=p2p,
    )
    sums = None
    if groups.is_last_stage:
        sums = torch.stack(list(results)).sum(0).to(groups.device)  # [len(keys)]
        dp_sum_(sums, groups)
    sums = broadcast_from_last_stage(sums, (len(keys),), torch.float64, groups)
    values = dict(zip(keys, sums.tolist()))
    return values.pop("loss_sum") / norm, values


def optimizer_step(
    model, optimizer: torch.optim.Optimizer, groups: ParallelGroups, loss: float, max_norm: float
) -> tuple[float, bool]:
    """Synchronise, check, clip and apply gradients. Returns (grad norm, skipped)."""
    sync_grads(model, groups)
    norm = grad_norm(model, groups)
    if not all_finite(loss, groups) or not all_finite(norm, groups):
        optimizer.zero_grad(set_to_none=True)
        return norm, True
    clip_grads(model, max_norm, norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm, False
