"""Turning prompt rows into padded training batches (SFT now, dataset sequences of GKD/OPD later).

Convention (labels already shifted, as Megatron's GPT loss expects): for a sequence of length ``L``,

* ``tokens[t]`` is the input at position ``t``;
* ``labels[t] = tokens[t + 1]`` is the token position ``t`` predicts; the last label is ``pad``;
* ``loss_mask[t] = 1`` iff ``labels[t]`` belongs to the completion (reference tokens and the final EOS),
  so the prompt is never a target, and neither is padding.

Example (char tokenizer, BOS on): ``[bos] a d d ... = 1 6 8 [eos]``: the mask is 1 from the position of
``=`` (which predicts ``1``) to the position of ``8`` (which predicts EOS).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from opd_megatron.data.jsonl import DataError, PromptRow
from opd_megatron.tokenization.base import Tokenizer

__all__ = ["SFTExample", "collate", "encode_sft_example"]


class SFTExample(NamedTuple):
    """One sequence, unpadded: three lists of equal length ``L``."""

    tokens: list[int]
    labels: list[int]
    loss_mask: list[int]


def encode_sft_example(
    tokenizer: Tokenizer,
    row: PromptRow,
    max_len: int,
    *,
    truncate: bool = False,
    add_bos: bool = True,
    prompt_ids: list[int] | None = None,
    end_id: int | None = None,
) -> SFTExample:
    """Encode ``[bos] + prompt + reference + [eos]`` with shifted labels and a completion-only loss mask.

    For chat data pass the row's rendered prompt as ``prompt_ids`` (from
    :func:`~opd_megatron.data.render.render_prompt`; ``add_bos`` is then ignored) and the template's
    end-of-turn token as ``end_id`` (:func:`~opd_megatron.data.render.completion_end_ids`), so the model
    learns to end its turn the way its template does; by default the completion ends with EOS.

    ``bos`` is added when ``add_bos`` and the tokenizer has one. Prompt and reference are encoded
    separately, as a rollout would produce them (prompt tokens, then sampled tokens), rather than as one
    string, which a merge-based tokenizer could split differently at the boundary.

    A sequence longer than ``max_len`` raises :class:`DataError` naming the row, unless ``truncate``:
    then the end is cut off (losing the EOS target). A prompt that leaves no completion target inside
    ``max_len`` is an error even with ``truncate``, since the example would train nothing.
    """
    if row.reference is None:
        raise DataError(f"{row.where()} has no reference; supervised fine-tuning needs one")
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}")
    if prompt_ids is None:
        prefix = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
        prompt_ids = prefix + tokenizer.encode(row.prompt)
    completion_ids = tokenizer.encode(row.reference) + [tokenizer.eos_id if end_id is None else end_id]
    tokens = prompt_ids + completion_ids
    if len(tokens) > max_len:
        if not truncate or len(prompt_ids) >= max_len:
            why = "" if not truncate else " (truncation would leave no completion token)"
            raise DataError(
                f"{row.where()} is {len(tokens)} tokens ({len(prompt_ids)} prompt + {len(completion_ids)} "
                f"completion incl. EOS), longer than max_len={max_len}{why}; raise the sequence length, "
                "shorten the row, or pass truncate=True"
            )
        tokens = tokens[:max_len]
    labels = tokens[1:] + [tokenizer.pad_id]
    n_prompt = len(prompt_ids)
    # labels[t] = tokens[t + 1] is a completion token iff t + 1 >= n_prompt, and t < L - 1 (the last
    # label is padding).
    loss_mask = [1 if n_prompt - 1 <= t < len(tokens) - 1 else 0 for t in range(len(tokens))]
    return SFTExample(tokens, labels, loss_mask)


def collate(examples: Sequence[SFTExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples into a batch.

    Returns ``tokens`` and ``labels`` (int64, ``[B, L]``, padded with ``pad_id``), ``loss_mask`` (float32,
    ``[B, L]``, 0 on padding), and ``lengths`` (int64, ``[B]``, unpadded lengths), where ``L`` is the
    longest example.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    seq_len = max(len(ex.tokens) for ex in examples)
    batch = len(examples)
    tokens_BL = torch.full((batch, seq_len), pad_id, dtype=torch.long)
    labels_BL = torch.full((batch, seq_len), pad_id, dtype=torch.long)
    mask_BL = torch.zeros((batch, seq_len), dtype=torch.float32)
    for i, ex in enumerate(examples):
        n = len(ex.tokens)
        if not len(ex.labels) == len(ex.loss_mask) == n:
            raise ValueError(
                f"example {i}: tokens/labels/loss_mask lengths differ ({n}, {len(ex.labels)}, {len(ex.loss_mask)})"
            )
        tokens_BL[i, :n] = torch.tensor(ex.tokens, dtype=torch.long)
        labels_BL[i, :n] = torch.tensor(ex.labels, dtype=torch.long)
        mask_BL[i, :n] = torch.tensor(ex.loss_mask, dtype=torch.float32)
    lengths_B = torch.tensor([len(ex.tokens) for ex in examples], dtype=torch.long)
    return {"tokens": tokens_BL, "labels": labels_BL, "loss_mask": mask_BL, "lengths": lengths_B}
