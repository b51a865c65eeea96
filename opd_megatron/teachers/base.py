"""The Teacher interface.

A teacher receives the rollouts of a micro-batch (prompt rows, the student's prompt token ids and the
completion token ids it sampled) and returns, for every completion token in row-major order, what the
loss needs to compare against the student's prediction of that token. ``N = sum(len(completion))``; row
``i``'s tokens come before row ``i + 1``'s. The student side enumerates its loss positions in the same
order (``loss_mask == 1``, row-major), so the two line up whatever prompt the teacher was shown
(self-distillation shows it a privileged one) or however it tokenised the text.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch

from opd_megatron.data.jsonl import PromptRow


class TeacherError(RuntimeError):
    """A teacher failed to score (unreachable, bad output); the message names the teacher."""


@dataclass
class TeacherTargets:
    """Per-token teacher scores for the fused loss, present on the last pipeline stage only."""

    hidden_NH: torch.Tensor
    """Teacher pre-lm-head hidden states, one row per completion token."""
    weight_VH: torch.Tensor
    """The teacher's output-layer shard on this TP rank (same vocabulary split as the student's)."""

    def logits_NV(self) -> torch.Tensor:
        """This rank's teacher logits shard (for the sampled-token objectives; small batches only)."""
        return self.hidden_NH.float() @ self.weight_VH.float().t()

    def finite(self) -> bool:
        return bool(torch.isfinite(self.hidden_NH).all())


@dataclass
class TopKTargets:
    """Sparse per-token teacher scores (remote teachers): the teacher's top-k over its whole vocabulary,
    one row per completion token, for :func:`~opd_megatron.losses.topk.topk_distillation_loss`."""

    topk_ids_NK: torch.Tensor
    """``[N, k]`` global vocabulary ids, most likely first."""
    topk_logprobs_NK: torch.Tensor
    """``[N, k]`` the teacher's normalised log-probs of those ids (temperature 1)."""
    token_logprobs_N: torch.Tensor
    """``[N]`` the teacher's log-prob of the sampled token (for the sampled-token objectives)."""

    def finite(self) -> bool:
        return bool(
            torch.isfinite(self.topk_logprobs_NK).all() and torch.isfinite(self.token_logprobs_N).all()
        )


class Teacher(abc.ABC):
    name: str

    @abc.abstractmethod
    def score(
        self, rows: list[PromptRow], prompt_ids: list[list[int]], completion_ids: list[list[int]]
    ) -> TeacherTargets | TopKTargets | None:
        """Score every completion token; collective over the teacher's TP/PP groups. Returns the targets
        on the last pipeline stage and ``None`` on the others (dense hidden states from a co-located
        teacher, sparse top-k from a remote one)."""

    def after_step(self, student, step: int) -> None:  # noqa: B027 (optional hook)
        """Called after every optimizer step (self-distillation teachers track the student here)."""
