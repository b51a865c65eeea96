"""Scores one step's rollouts with the teachers the routing picks.

Per step the trainer asks :meth:`MOPDOrchestrator.plan` how to group the step's rollouts (one teacher per
group, at most a micro-batch each), builds one micro-batch per group, and calls
:meth:`MOPDOrchestrator.score`, which fills every micro-batch's ``target``:

- co-located teachers run one after another in this thread (they share the devices and the TP/PP
  collectives);
- remote teachers (scoring services) run concurrently in a thread pool, overlapping with the co-located
  forwards; the HTTP work is theirs, the targets are top-k;
- a teacher of another tokenizer returns cross-tokeniser targets (re-emitted and re-scored on its own
  tokenisation);
- under ``mixture`` routing every teacher scores every micro-batch and the targets are their weighted
  mixture.

Confidence routing scores every rollout with every teacher to choose; the chosen teacher's targets of that
pass are kept in the plan (``Group.target``) and supervise the micro-batch, so no rollout is scored twice.

A micro-batch is anything with ``teacher_name``, ``rows``, ``prompts``, ``comps``, ``target`` and
``prescored`` attributes (the trainer's ``MicroBatch``). A teacher failure (unreachable service, retries
exhausted, malformed answer; non-finite output is handled by the trainer) raises :class:`StepAborted` on
every rank, after all of them agreed, so no rank steps the optimizer.
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from opd_megatron.config import RunConfig
from opd_megatron.distributed import ParallelGroups
from opd_megatron.distributed.grads import all_finite
from opd_megatron.distributed.pipeline import broadcast_from_last_stage
from opd_megatron.mopd.mixing import js_disagreement, mixture_weights, rollout_confidence, token_stats
from opd_megatron.mopd.registry import default_teacher
from opd_megatron.mopd.routing import ConfidenceRouter, PassRateRouter, SpecialtyRouter
from opd_megatron.targets import CrossTokenizerTargets, MixtureTargets, Targets
from opd_megatron.teachers.base import Teacher, TeacherError
from opd_megatron.teachers.cross import CrossTokenizerTeacher
from opd_megatron.teachers.remote import RemoteTeacher

MIXTURE = "*mixture*"
"""Pseudo teacher name of micro-batches scored by every teacher (mixture routing)."""


class StepAborted(RuntimeError):
    """A teacher failed while scoring this step; no rank applies an update. ``teacher`` is its name (or
    None when it failed on another rank)."""

    def __init__(self, teacher: str | None, message: str):
        super().__init__(message)
        self.teacher = teacher


@dataclass
class Group:
    """Rollouts (indices into the step's lists) that one teacher supervises in one micro-batch."""

    teacher: str
    indices: list[int]
    target: Targets | None = None
    """Targets already computed while routing (confidence routing); see ``prescored``."""
    prescored: bool = False


def _chunks(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def is_remote(t: Teacher) -> bool:
    return isinstance(t.inner if isinstance(t, CrossTokenizerTeacher) else t, RemoteTeacher)


class MOPDOrchestrator:
    """Routing, scoring and per-teacher accounting for one run's teachers (``teachers`` in config order)."""

    def __init__(
        self,
        teachers: dict[str, Teacher],
        cfg: RunConfig,
        groups: ParallelGroups,
        vocab: int,
        micro_batch_size: int,
        pass_rates: dict[str, dict[str, float]] | None = None,
        student_tok=None,
    ):
        self.teachers, self.cfg, self.m, self.groups = teachers, cfg, cfg.mopd, groups
        self.student_tok = student_tok
        """Gives completion lengths in bytes (confidence routing compares teachers per byte)."""
        self.vocab, self.micro_batch_size = vocab, micro_batch_size
        self.names = list(teachers)
        self.default = default_teacher(cfg)
        routing = self.m.routing if len(teachers) > 1 else "specialty"
        self.routing = routing
        if routing == "specialty":
            claims = {t.name: t.domains for t in cfg.teachers}
            self.router = SpecialtyRouter(claims, self.default, self.m.exclusive)
        elif routing == "pass_rate":
            self.router = PassRateRouter(pass_rates or self.m.pass_rates, self.names, self.default)
        elif routing == "confidence":
            self.router = ConfidenceRouter()
        self.fixed_weights = [t.weight for t in cfg.teachers]
        self.rollouts: Counter[str] = Counter()
        """Rollouts each teacher supervised (all steps)."""
        self.tokens: Counter[str] = Counter()
        self.score_seconds: Counter[str] = Counter()

    # ------------------------------------------------------------------ routing
    def plan(self, rows, prompts, comps, size: int) -> list[Group]:
        """Group the rollouts by supervising teacher, at most ``size`` per group (teachers in order of
        first appearance), the same on every rank of a pipeline. Under confidence routing the groups
        carry the chosen teacher's targets from the routing pass."""
        everyone = list(range(len(rows)))
        if self.routing == "mixture":
            return [Group(MIXTURE, c) for c in _chunks(everyone, size)]
        if self.routing == "confidence":
            return [
                g for c in _chunks(everyone, size) for g in self._confidence_groups(rows, prompts, comps, c)
            ]
        names = self.router.route(rows)
        return [
            Group(name, c)
            for name in dict.fromkeys(names)
            for c in _chunks([i for i in everyone if names[i] == name], size)
        ]

    def _confidence_groups(self, rows, prompts, comps, chunk: list[int]) -> list[Group]:
        """Every teacher scores the rollouts of ``chunk``; each rollout goes to the most confident teacher,
        whose targets of this pass it keeps (decided on the last stage, broadcast along the pipeline)."""
        pick = lambda xs: [xs[i] for i in chunk]  # noqa: E731
        c_rows, c_prompts, c_comps = pick(rows), pick(prompts), pick(comps)
        text_bytes = [len(b"".join(self.student_tok.token_bytes(c))) for c in c_comps]
        targets, failure = {}, None
        for n in self.names:
            try:
                targets[n] = self._call(n, c_rows, c_prompts, c_comps)
            except TeacherError as e:
                failure = (n, str(e))
                break
        self._agree(failure)
        scores = {n: self._confidence(n, t, c_comps, text_bytes) for n, t in targets.items()}
        choice = None
        if self.groups.is_last_stage:
            chosen = self.router.choose(scores)
            choice = torch.tensor(
                [self.names.index(c) for c in chosen], dtype=torch.float64, device=self.groups.device
            )
        choice = broadcast_from_last_stage(choice, (len(chunk),), torch.float64, self.groups).tolist()
        lengths = [len(c) for c in c_comps]
        groups = []
        for n in dict.fromkeys(self.names[int(i)] for i in choice):
            local = [j for j, i in enumerate(choice) if self.names[int(i)] == n]
            tgt = targets[n]
            kept = tgt.take_rows(lengths, local) if tgt is not None else None
            groups.append(Group(n, [chunk[j] for j in local], kept, prescored=True))
        return groups

    def _confidence(self, name: str, tgt, comps, text_bytes) -> list[float]:
        """Teacher ``name``'s confidence per rollout from its targets ``tgt`` (0 off the last stage)."""
        inner = tgt.inner if isinstance(tgt, CrossTokenizerTargets) else tgt
        if inner is None:
            return [0.0] * len(comps)
        labels = tgt.teacher_completion_ids if isinstance(tgt, CrossTokenizerTargets) else comps
        flat = torch.tensor([t for c in labels for t in c], dtype=torch.long, device=self.groups.device)
        lp_N, ent_N = token_stats(tgt, flat, self._group(name), self._vocab(name))
        return rollout_confidence(lp_N, ent_N, [len(c) for c in labels], text_bytes, self.m.confidence)

    # ------------------------------------------------------------------ scoring
    def _group(self, name: str):
        t = self.teachers[name]
        g = getattr(t.inner if isinstance(t, CrossTokenizerTeacher) else t, "groups", None) or self.groups
        return g.tp_group_or_none

    def _vocab(self, name: str) -> int:
        t = self.teachers[name]
        return t.teacher_tok.vocab_size if isinstance(t, CrossTokenizerTeacher) else self.vocab

    def _call(self, name: str, rows, prompts, comps):
        t0 = time.monotonic()
        try:
            return self.teachers[name].score(rows, prompts, comps)
        finally:
            self.score_seconds[name] += time.monotonic() - t0

    def _agree(self, failure: tuple[str | None, str] | None) -> None:
        # Every rank learns whether any rank failed, so none of them steps alone.
        if not all_finite(0.0 if failure is None else float("nan"), self.groups):
            if failure is None:
                raise StepAborted(None, "a teacher failed on another rank")
            raise StepAborted(*failure)

    def score_microbatch(self, mb) -> Targets | None:
        """The targets of one micro-batch from its teacher (or, under mixture routing, every teacher and
        their per-token mixture weights)."""
        name = mb.teacher_name
        if name != MIXTURE:
            return self._call(name, mb.rows, mb.prompts, mb.comps)
        parts = [self._call(n, mb.rows, mb.prompts, mb.comps) for n in self.names]
        if parts[0] is None:  # not the last pipeline stage
            return None
        lengths = [len(c) for c in mb.comps]
        mode, lp_MN, rows_MR = self.m.mixture_weights, None, None
        if mode != "fixed":
            flat = torch.tensor([t for c in mb.comps for t in c], dtype=torch.long, device=self.groups.device)
            group = self._group(self.names[0])
            lp_MN = torch.stack([token_stats(p, flat, group, self.vocab)[0] for p in parts])
            bounds = torch.tensor([0, *lengths]).cumsum(0).tolist()
            rows_MR = torch.stack(
                [torch.stack([x[a:b].mean() for a, b in zip(bounds[:-1], bounds[1:])]) for x in lp_MN]
            )
        w_MN = mixture_weights(mode, self.fixed_weights, lengths, rows_MR, lp_MN, self.m.mixture_temperature)
        return MixtureTargets(parts, w_MN.to(self.groups.device))

    def score(self, mbs: list) -> None:
        """Fill ``mb.target`` of every micro-batch not scored while routing; raises :class:`StepAborted`
        on every rank when a teacher failed on any."""
        todo = [mb for mb in mbs if not mb.prescored]
        failure: tuple[str, str] | None = None
        # Remote teachers run in threads only where no TP collective is involved (a TP peer broadcast
        # inside a thread could interleave with the co-located teachers' collectives).
        concurrent = [
            mb
            for mb in todo
            if self.groups.tp_size == 1
            and mb.teacher_name != MIXTURE
            and is_remote(self.teachers[mb.teacher_name])
        ]
        with ThreadPoolExecutor(max_workers=max(1, min(8, len(concurrent)))) as pool:
            futures = [(mb, pool.submit(self.score_microbatch, mb)) for mb in concurrent]
            threaded = {id(mb) for mb in concurrent}
            for mb in todo:
                if id(mb) in threaded:
                    continue
                try:
                    mb.target = self.score_microbatch(mb)
                except TeacherError as e:
                    failure = failure or (mb.teacher_name, str(e))
                    break
            for mb, fut in futures:
                try:
                    mb.target = fut.result()
                except TeacherError as e:
                    failure = failure or (mb.teacher_name, str(e))
        self._agree(failure)
        for mb in mbs:
            for n in self.names if mb.teacher_name == MIXTURE else [mb.teacher_name]:
                self.rollouts[n] += len(mb.rows)
                self.tokens[n] += sum(len(c) for c in mb.comps)

    # ------------------------------------------------------------------ disagreement
    def dense_same_vocab(self) -> list[str]:
        return [
            n
            for n, t in self.teachers.items()
            if getattr(t, "dense", False) and not isinstance(t, CrossTokenizerTeacher)
        ]

    @torch.no_grad()
    def disagreement(self, mbs: list) -> float | None:
        """Mean per-token JS divergence between the co-located same-vocabulary teachers on this step's
        rollouts (mixture weights under mixture routing, uniform otherwise); None with fewer than two."""
        names = self.dense_same_vocab()
        if len(names) < 2:
            return None
        total, count = 0.0, 0
        for mb in mbs:
            if mb.teacher_name == MIXTURE:
                tgt = mb.target
                if tgt is None:
                    continue
                parts, w_MN = tgt.parts, tgt.weights_MN
            else:
                parts = [self._call(n, mb.rows, mb.prompts, mb.comps) for n in names]
                if parts[0] is None:
                    continue
                n_tok = parts[0].hidden_NH.shape[0]
                w_MN = torch.full(
                    (len(names), n_tok), 1.0 / len(names), dtype=torch.float64, device=self.groups.device
                )
            js_N = js_disagreement(parts, w_MN, self._group(names[0]), self.vocab)
            total += float(js_N.sum())
            count += js_N.numel()
        value = (
            torch.tensor([total / max(count, 1)], dtype=torch.float64, device=self.groups.device)
            if self.groups.is_last_stage
            else None
        )
        return float(broadcast_from_last_stage(value, (1,), torch.float64, self.groups).item())

    def counters(self) -> dict[str, float]:
        out = {}
        for n in self.names:
            out[f"teacher/{n}/rollouts"] = float(self.rollouts[n])
            out[f"teacher/{n}/tokens"] = float(self.tokens[n])
        return out
