"""Batched greedy decoding by full recomputation: the simple, exact reference used for evaluation.

Prompts of mixed length are left-padded; pad keys are masked out. Rotary embeddings depend only on the
distance between query and key, so a left-padded row computes exactly what it would alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from opd_megatron.distributed import ParallelGroups
from opd_megatron.distributed.pipeline import broadcast_from_last_stage, pipeline_forward
from opd_megatron.models.gpt import vocab_shard_range
from opd_megatron.rollout.vocab_parallel import mask_padded_vocab, vocab_parallel_argmax


def padding_attention_mask(pad_BS: torch.Tensor) -> torch.Tensor:
    """Megatron boolean mask ``[B, 1, S, S]`` (True = blocked) that blocks pad keys. Each position may
    always see itself, so pad rows stay finite instead of attending to nothing (NaN would leak through
    ``0 * NaN`` in the value product)."""
    s = pad_BS.shape[1]
    blocked_BSS = pad_BS[:, None, :].expand(-1, s, -1).clone()
    blocked_BSS[:, torch.arange(s), torch.arange(s)] = False
    return blocked_BSS.unsqueeze(1)


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids_BS = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    pad_BS = torch.ones(len(prompts), width, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        if p:
            ids_BS[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            pad_BS[i, width - len(p) :] = False
    return ids_BS, pad_BS


@torch.no_grad()
def greedy_generate(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_id: int | Sequence[int],
    pad_id: int,
    groups: ParallelGroups,
) -> list[list[int]]:
    """Greedy completions (without the prompt, cut at the first of the ``eos_id`` ids, which is
    excluded) for every prompt."""
    ends = {eos_id} if isinstance(eos_id, int) else set(eos_id)
    was_training = model.training
    model.eval()
    ids_BS, pad_BS = left_pad(prompts, pad_id, groups.device)
    b = ids_BS.shape[0]
    done_B = torch.zeros(b, dtype=torch.bool, device=groups.device)
    out: list[list[int]] = [[] for _ in range(b)]
    start, _ = vocab_shard_range(model, groups.tp_rank, groups.tp_size)
    for _ in range(max_new_tokens):
        s = ids_BS.shape[1]
        pos_BS = torch.arange(s, device=groups.device).expand(b, s)
        mask = padding_attention_mask(pad_BS) if pad_BS.any() else None
        logits = pipeline_forward(model, ids_BS, pos_BS, groups, attention_mask=mask)
        nxt_B = None
        if groups.is_last_stage:
            last_BV = mask_padded_vocab(logits[:, -1, :].float(), start, model.real_vocab_size)
            nxt_B = vocab_parallel_argmax(last_BV, start, groups.tp_group, groups.tp_size)
        nxt_B = broadcast_from_last_stage(nxt_B, (b,), torch.long, groups)
        for i in range(b):
            if not done_B[i]:
                if nxt_B[i].item() in ends:
                    done_B[i] = True
                else:
                    out[i].append(int(nxt_B[i]))
        if bool(done_B.all()):
            break
        ids_BS = torch.cat([ids_BS, nxt_B[:, None]], dim=1)
        pad_BS = torch.cat([pad_BS, torch.zeros(b, 1, dtype=torch.bool, device=groups.device)], dim=1)
    model.train(was_training)
    return out
