"""Typed batches of the training loops and how they are built.

An OPD step goes: the step's rows (:class:`DataCursor`) -> their completions (:class:`OPDBatch`, built by
:mod:`~opd_megatron.train.rollouts`) -> micro-batches (:class:`MicroBatch`), one per group of rollouts
that one teacher supervises (the orchestrator's plan). SFT builds :class:`MicroBatch` es from reference
completions directly.

Layout of a micro-batch ``[B, S]`` (labels already shifted, as Megatron's GPT loss expects): row ``i``
holds ``prompt_i + completion_i`` right-padded; ``labels[t] = tokens[t + 1]``; the completion token ``j``
of row ``i`` is predicted at position ``len(prompt_i) - 1 + j``, where ``loss_mask`` is 1. Under pipeline
parallelism all micro-batches of a step share one shape (stages exchange fixed shapes); padding rows
carry no loss.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from opd_megatron.data.batching import SFTExample, collate
from opd_megatron.data.jsonl import PromptRow
from opd_megatron.targets import Targets


class DataCursor:
    """Deterministic epoch-wise shuffling; the position is two integers, so resume is exact."""

    def __init__(self, n: int, seed: int, epoch: int = 0, offset: int = 0):
        self.n, self.seed, self.epoch, self.offset = n, seed, epoch, offset
        self._perm = self._permutation(epoch)

    def _permutation(self, epoch: int) -> list[int]:
        perm = list(range(self.n))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(perm)
        return perm

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.offset == self.n:
                self.epoch, self.offset = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
            take = min(k - len(out), self.n - self.offset)
            out.extend(self._perm[self.offset : self.offset + take])
            self.offset += take
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}


@dataclass
class OPDBatch:
    """This rank's rollouts of one step (rows whose completion came back empty already dropped)."""

    rows: list[PromptRow]
    prompts: list[list[int]]
    comps: list[list[int]]
    """Completion token ids per rollout (student samples, or off-policy sequences after them)."""
    behaviour: list[list[float]]
    """Log-probs of each completion token under the distribution that sampled it (0 off-policy)."""
    weights: list[list[float]]
    """Per-token loss weights (MiniLLM importance weights; 1 otherwise)."""
    lam: float
    """The on-policy share of this step (GKD lambda)."""
    n_on: int
    """The first ``n_on`` rollouts are the student's own samples."""
    empty: int = 0
    """Rollouts dropped because their completion was empty."""
    pass_counts: tuple[int, int] = (0, 0)
    """With several samples per prompt: (prompts with at least one correct on-policy sample, prompts of
    verifiable domains) on this rank; pass@n is their ratio summed over data-parallel ranks."""
    ended_fraction: float | None = None
    """Share of the on-policy samples that ended at an end token (the chat template's end-of-turn or EOS)
    rather than at ``max_new_tokens`` or a stop string; None without on-policy samples."""

    @property
    def tokens(self) -> int:
        return sum(len(c) for c in self.comps)

    @property
    def generated_tokens(self) -> int:
        return sum(len(c) for c in self.comps[: self.n_on])


@dataclass
class MicroBatch:
    """One forward/backward's worth of sequences; tensors ``[B, S]`` on the rank's device."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    """1.0 where ``labels`` is a completion token (the loss positions), else 0."""
    behaviour: torch.Tensor | None = None
    """Behaviour log-probs at the loss positions (OPD)."""
    weights: torch.Tensor | None = None
    """Per-token loss weights at the loss positions (OPD)."""
    rows: list[PromptRow] = field(default_factory=list)
    prompts: list[list[int]] = field(default_factory=list)
    comps: list[list[int]] = field(default_factory=list)
    teacher_name: str = ""
    """The teacher that supervises these rollouts (the orchestrator's pseudo name under mixture routing)."""
    target: Targets | None = None
    """The teacher's targets (last pipeline stage), filled by the orchestrator."""
    prescored: bool = False
    """The targets were computed while routing (confidence routing); the orchestrator keeps them."""
    reference: Targets | None = None
    """G-OPD: the reference model's targets for the same tokens."""

    @property
    def loss_positions(self) -> torch.Tensor:
        """Bool ``[B, S]`` of the loss positions."""
        return self.loss_mask.bool()


def pad_to(t_BS: torch.Tensor, width: int, fill: float | int) -> torch.Tensor:
    """Right-pad a ``[B, S]`` tensor to ``width`` columns."""
    if t_BS.shape[1] >= width:
        return t_BS
    return torch.cat([t_BS, t_BS.new_full((t_BS.shape[0], width - t_BS.shape[1]), fill)], dim=1)


def completion_grid(prompts, comps, values, width: int, n_rows: int | None = None) -> torch.Tensor:
    """Place per-completion-token ``values`` at their loss positions of a ``[n_rows, width]`` grid (rows
    beyond ``len(prompts)`` stay 0)."""
    grid_BS = torch.zeros(n_rows or len(prompts), width)
    for i, (p, c, v) in enumerate(zip(prompts, comps, values)):
        grid_BS[i, len(p) - 1 : len(p) - 1 + len(c)] = torch.tensor(v, dtype=torch.float32)
    return grid_BS


def opd_microbatch(
    batch: OPDBatch, indices: Sequence[int], width: int, n_rows: int, pad_id: int, device
) -> MicroBatch:
    """The micro-batch of rollouts ``indices`` of ``batch``, ``n_rows`` x ``width`` (extra rows padding)."""
    pick = lambda xs: [xs[i] for i in indices]  # noqa: E731
    prompts, comps = pick(batch.prompts), pick(batch.comps)
    tokens_BS = torch.full((n_rows, width), pad_id, dtype=torch.long)
    for j, (p, c) in enumerate(zip(prompts, comps)):
        tokens_BS[j, : len(p) + len(c)] = torch.tensor(p + c)
    labels_BS = torch.roll(tokens_BS, -1, dims=1)
    labels_BS[:, -1] = pad_id
    grid = lambda values: completion_grid(prompts, comps, values, width, n_rows).to(device)  # noqa: E731
    return MicroBatch(
        tokens=tokens_BS.to(device),
        labels=labels_BS.to(device),
        loss_mask=grid([[1.0] * len(c) for c in comps]),
        behaviour=grid(pick(batch.behaviour)),
        weights=grid(pick(batch.weights)),
        rows=pick(batch.rows),
        prompts=prompts,
        comps=comps,
    )


def sft_microbatches(
    examples: Sequence[SFTExample], size: int, width: int, pad_id: int, device
) -> list[MicroBatch]:
    """Micro-batches of ``size`` examples, all right-padded to ``width`` (pipeline stages exchange fixed
    shapes)."""
    out = []
    for i in range(0, len(examples), size):
        b = collate(examples[i : i + size], pad_id)
        out.append(
            MicroBatch(
                tokens=pad_to(b["tokens"], width, pad_id).to(device),
                labels=pad_to(b["labels"], width, pad_id).to(device),
                loss_mask=pad_to(b["loss_mask"], width, 0).to(device),
            )
        )
    return out


def token_budget_split(indices: Sequence[int], lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Split rollouts ``indices`` (``lengths[i]`` = prompt + completion tokens of rollout ``i``) into
    micro-batches of at most ``max_tokens`` padded tokens each (rows x the longest row).

    Longest first, then greedily: a micro-batch takes the next rollout while ``(rows + 1) * width <=
    max_tokens``, where ``width`` is its first (longest) rollout's length. Rollouts of similar length
    land together, so padding stays small. A rollout longer than the budget goes alone.
    """
    order = sorted(indices, key=lambda i: -lengths[i])
    out: list[list[int]] = []
    for i in order:
        if out and (len(out[-1]) + 1) * lengths[out[-1][0]] <= max_tokens:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def padding_fraction(mbs: Sequence[MicroBatch]) -> float:
    """Share of the micro-batches' ``[B, S]`` token slots that hold padding (rows and columns)."""
    real = sum(len(p) + len(c) for mb in mbs for p, c in zip(mb.prompts, mb.comps))
    slots = sum(mb.tokens.numel() for mb in mbs)
    return 1.0 - real / max(slots, 1)
