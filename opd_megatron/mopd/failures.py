"""Teacher failures during training, counted per teacher.

A step's teachers either scored it fine, failed it (non-finite scores, or an error that aborted the step),
or were not asked (the routing gave their rollouts to no one this step). :class:`TeacherStreaks` agrees
on that outcome across every rank (one small all-reduce) and keeps, per teacher, how many of the steps
it was asked for it failed in a row: a teacher that keeps failing stops the run after
``mopd.max_teacher_failures`` of its own failures, even when the routing gives it only some of the steps
and the other teachers' steps succeed in between.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from opd_megatron.distributed import ParallelGroups
from opd_megatron.mopd.orchestrator import MIXTURE

FINE, FAILED = 1.0, 2.0
"""A teacher's outcome in a step (absent: not asked); the larger wins when ranks disagree."""


class TeacherStreaks:
    """Consecutive failures per teacher, the same on every rank."""

    def __init__(self, names: Iterable[str], limit: int, groups: ParallelGroups):
        self.names, self.limit, self.groups = list(names), limit, groups
        self.streak = dict.fromkeys(self.names, 0)

    def members(self, name: str | None) -> list[str]:
        """The teachers behind a micro-batch's teacher name (every one for a mixture)."""
        return list(self.names) if name == MIXTURE or name not in self.streak else [name]

    def of_microbatches(self, mbs) -> dict[str, float]:
        """This rank's outcome of a scored step: FAILED for a teacher with non-finite targets, else FINE."""
        out: dict[str, float] = {}
        for mb in mbs:
            bad = mb.target is not None and not mb.target.finite()
            for name in self.members(mb.teacher_name):
                out[name] = max(out.get(name, 0.0), FAILED if bad else FINE)
        return out

    def agree(self, outcome: dict[str, float]) -> dict[str, float]:
        """The step's outcome over every rank (collective: every rank calls it at the same point)."""
        flags = torch.tensor([outcome.get(n, 0.0) for n in self.names], dtype=torch.float32)
        flags = flags.to(self.groups.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return {n: v for n, v in zip(self.names, flags.tolist()) if v}

    def record(self, outcome: dict[str, float]) -> list[str]:
        """Count an agreed outcome (a failure adds one, a fine score ends the streak, a teacher not asked
        keeps its count); returns the failed teachers whose streak reached the limit."""
        for name, value in outcome.items():
            self.streak[name] = self.streak[name] + 1 if value == FAILED else 0
        return [n for n in self.names if outcome.get(n) == FAILED and self.streak[n] >= self.limit]

    @staticmethod
    def failed(outcome: dict[str, float]) -> list[str]:
        return [n for n, v in outcome.items() if v == FAILED]
