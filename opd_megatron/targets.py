"""What a teacher hands the loss: one target type per kind of teacher.

This module sits below ``teachers/``, ``mopd/`` and ``losses/``: teachers produce these objects, the
orchestrator combines them, and the objectives of the training loop consume them. Every target holds one
row per scored completion token in row-major order (row ``i``'s tokens before row ``i + 1``'s), so the
student's loss positions (``loss_mask == 1``, row-major) line up with it.

Every target kind carries what its loss needs and nothing travels through a side channel: a
cross-tokeniser target carries the teacher's vocabulary size, the projector onto the student's vocabulary,
the shared ids, and the alignment statistics of the rollouts it scored.

``take_rows(lengths, keep)`` gives the target of a subset of the rollouts (in ``keep``'s order), so
targets computed once for routing can supervise the micro-batches the routing then forms.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from opd_megatron.tokenization.alignment import Alignment, alignment_stats


def _token_index(lengths: Sequence[int], keep: Sequence[int], device=None) -> torch.Tensor:
    """Token rows (row-major over ``lengths``) of the rollouts in ``keep``, in ``keep``'s order."""
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    idx = [t for i in keep for t in range(starts[i], starts[i] + lengths[i])]
    return torch.tensor(idx, dtype=torch.long, device=device)


@dataclass
class TeacherTargets:
    """Dense per-token scores of a co-located teacher of the student's vocabulary, present on the last
    pipeline stage only: its pre-lm-head hidden states and output-layer shard (the fused loss forms the
    logits chunk by chunk)."""

    hidden_NH: torch.Tensor
    """Teacher pre-lm-head hidden states, one row per completion token."""
    weight_VH: torch.Tensor
    """The teacher's output-layer shard on this TP rank (same vocabulary split as the student's)."""

    def logits_NV(self) -> torch.Tensor:
        """This rank's teacher logits shard (for the sampled-token objectives; small batches only)."""
        return self.hidden_NH.float() @ self.weight_VH.float().t()

    def finite(self) -> bool:
        return bool(torch.isfinite(self.hidden_NH).all())

    def take_rows(self, lengths: Sequence[int], keep: Sequence[int]) -> TeacherTargets:
        idx = _token_index(lengths, keep, self.hidden_NH.device)
        return TeacherTargets(self.hidden_NH[idx], self.weight_VH)


@dataclass
class TopKTargets:
    """Sparse per-token teacher scores (scoring services): the teacher's top-k over its whole vocabulary,
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

    def take_rows(self, lengths: Sequence[int], keep: Sequence[int]) -> TopKTargets:
        idx = _token_index(lengths, keep, self.topk_ids_NK.device)
        return TopKTargets(self.topk_ids_NK[idx], self.topk_logprobs_NK[idx], self.token_logprobs_N[idx])


@dataclass
class MixtureTargets:
    """Every teacher's dense targets for the same tokens, and the per-token mixture weights ``[M, N]``
    (MOPD ``mixture`` routing: the KL target is ``p_mix = sum_i w_i p_i``)."""

    parts: list[TeacherTargets]
    weights_MN: torch.Tensor

    def finite(self) -> bool:
        return all(p.finite() for p in self.parts) and bool(torch.isfinite(self.weights_MN).all())


@dataclass
class CrossTokenizerTargets:
    """Targets of a teacher of another tokenizer for one micro-batch.

    ``inner`` is the wrapped teacher's targets on its own tokenisation (``None`` off the last pipeline
    stage); the other per-token fields index the *student's* completion tokens (row-major). Every rank
    holds the alignment fields, so whichever rank logs can read the alignment statistics."""

    inner: TeacherTargets | TopKTargets | None
    """The wrapped teacher's targets, one row per *teacher* completion token (row-major)."""
    aligned_N: torch.Tensor
    """Bool per student completion token: both tokenisations end a token here and agree on the context,
    so the KL applies."""
    teacher_index_N: torch.Tensor
    """Long per student completion token: the row of ``inner`` it is compared with, -1 for none."""
    teacher_completion_ids: list[list[int]]
    alignments: list[Alignment]
    context_N: torch.Tensor | None = None
    """Bool per student completion token: it starts where its teacher token starts (same context on both
    sides); None means the same as ``aligned_N``."""
    prefix_N: list[bytes] | None = None
    """Per student completion token: bytes of its teacher token emitted before it (``b""`` at context
    positions); None means all empty."""
    teacher_vocab: int = 0
    """The teacher's real vocabulary size."""
    projector: Callable[[bytes], torch.Tensor] | None = None
    """Prefix bytes -> ``[W]`` map of teacher ids onto student ids (the projected cross-tokeniser KL)."""
    shared_ids: tuple[torch.Tensor, torch.Tensor] | None = None
    """(student ids, teacher ids) of the exact vocabulary intersection (the ``shared`` cross KL)."""

    def finite(self) -> bool:
        return self.inner is None or self.inner.finite()

    def stats(self) -> dict[str, float]:
        return alignment_stats(self.alignments)

    def take_rows(self, lengths: Sequence[int], keep: Sequence[int]) -> CrossTokenizerTargets:
        """The targets of rollouts ``keep`` (``lengths``: the student completion lengths of all rows);
        teacher rows are renumbered to the new ``inner``."""
        device = self.teacher_index_N.device
        s_idx = _token_index(lengths, keep, device)
        t_lengths = [len(c) for c in self.teacher_completion_ids]
        t_starts = torch.tensor([0, *t_lengths], device=device).cumsum(0)
        new_starts = torch.tensor([0, *(t_lengths[i] for i in keep)], device=device).cumsum(0)
        # The row of each kept student token, to move its teacher index from the old offset to the new.
        row_of = torch.repeat_interleave(
            torch.arange(len(keep), device=device), torch.tensor([lengths[i] for i in keep], device=device)
        )
        old_t = self.teacher_index_N[s_idx]
        shift = new_starts[row_of] - t_starts[torch.tensor(list(keep), device=device)[row_of]]
        new_t = torch.where(old_t >= 0, old_t + shift, old_t)
        inner = self.inner.take_rows(t_lengths, keep) if self.inner is not None else None
        return replace(
            self,
            inner=inner,
            aligned_N=self.aligned_N[s_idx],
            teacher_index_N=new_t,
            teacher_completion_ids=[self.teacher_completion_ids[i] for i in keep],
            alignments=[self.alignments[i] for i in keep],
            context_N=self.context_N[s_idx] if self.context_N is not None else None,
            prefix_N=[self.prefix_N[i] for i in s_idx.tolist()] if self.prefix_N is not None else None,
        )


Targets = TeacherTargets | TopKTargets | MixtureTargets | CrossTokenizerTargets
"""Any teacher target."""
