"""Scores one step's rollouts with the teachers the routing picks.

Per step the trainer asks :meth:`MOPDOrchestrator.assign` for a teacher per rollout, builds micro-batches
that each hold one teacher's rollouts, and calls :meth:`MOPDOrchestrator.score`, which fills every
micro-batch's ``teacher`` targets:

- co-located teachers run one after another in this thread (they share the devices and the TP/PP
  collectives);
- remote teachers (scoring services) run concurrently in a thread pool, overlapping with the co-located
  forwards; the HTTP work is theirs, the targets are top-k;
- a teacher of another tokenizer returns cross-tokeniser targets (re-emitted and re-scored on its own
  tokenisation);
- under ``mixture`` routing every teacher scores every micro-batch and the targets are their weighted
  mixture.

A teacher failure (unreachable service, retries exhausted, non-finite output is handled by the trainer)
raises :class:`StepAborted` on every rank, after all of them agreed, so no rank steps the optimizer.
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from opd_megatron.config import ConfigError, RunConfig
from opd_megatron.distributed import ParallelGroups
from opd_megatron.distributed.grads import all_finite
from opd_megatron.distributed.pipeline import broadcast_from_last_stage
from opd_megatron.mopd.mixing import js_disagreement, mixture_weights, rollout_confidence, token_stats
from opd_megatron.mopd.registry import default_teacher
from opd_megatron.mopd.routing import ConfidenceRouter, PassRateRouter, SpecialtyRouter
from opd_megatron.teachers.base import Teacher, TeacherError, TeacherTargets
from opd_megatron.teachers.cross import CrossTokenizerTargets, CrossTokenizerTeacher
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
class MixtureTargets:
    """Every teacher's dense targets for the same tokens, and the per-token mixture weights ``[M, N]``."""

    parts: list[TeacherTargets]
    weights_MN: torch.Tensor

    def finite(self) -> bool:
        return all(p.finite() for p in self.parts) and bool(torch.isfinite(self.weights_MN).all())


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
    def assign(self, rows, prompts, comps) -> list[str]:
        """A teacher name per rollout (``MIXTURE`` for all under mixture routing), the same on every rank
        of a pipeline (confidence scores exist on the last stage only and are broadcast)."""
        if self.routing == "mixture":
            return [MIXTURE] * len(rows)
        if self.routing != "confidence":
            return self.router.route(rows)
        text_bytes = [len(b"".join(self.student_tok.token_bytes(c))) for c in comps]
        scores = {name: self._confidence(name, rows, prompts, comps, text_bytes) for name in self.names}
        picks = None
        if self.groups.is_last_stage:
            chosen = self.router.choose(scores)
            picks = torch.tensor(
                [self.names.index(c) for c in chosen], dtype=torch.float64, device=self.groups.device
            )
        picks = broadcast_from_last_stage(picks, (len(rows),), torch.float64, self.groups)
        return [self.names[int(i)] for i in picks.tolist()]

    def _confidence(self, name, rows, prompts, comps, text_bytes) -> list[float]:
        """Teacher ``name``'s confidence per rollout (scored in micro-batch chunks)."""
        out: list[float] = []
        size = self.micro_batch_size
        for i in range(0, len(rows), size):
            sl = slice(i, i + size)
            tgt = self._call(name, rows[sl], prompts[sl], comps[sl])
            if tgt is None:
                out += [0.0] * len(rows[sl])
                continue
            labels = tgt.teacher_completion_ids if isinstance(tgt, CrossTokenizerTargets) else comps[sl]
            flat = torch.tensor([t for c in labels for t in c], dtype=torch.long, device=self.groups.device)
            lp_N, ent_N = token_stats(tgt, flat, self._group(name), self._vocab(name))
            out += rollout_confidence(
                lp_N, ent_N, [len(c) for c in labels], text_bytes[sl], self.m.confidence
            )
        return out

    # ------------------------------------------------------------------ scoring
    def _group(self, name: str):
        t = self.teachers[name]
        g = getattr(t.inner if isinstance(t, CrossTokenizerTeacher) else t, "groups", None) or self.groups
        return g.tp_group if g.tp_size > 1 else None

    def _vocab(self, name: str) -> int:
        t = self.teachers[name]
        return t.teacher_tok.vocab_size if isinstance(t, CrossTokenizerTeacher) else self.vocab

    def _call(self, name: str, rows, prompts, comps):
        t0 = time.monotonic()
        try:
            return self.teachers[name].score(rows, prompts, comps)
        finally:
            self.score_seconds[name] += time.monotonic() - t0

    def _score_mb(self, mb: dict):
        name = mb["teacher_name"]
        if name != MIXTURE:
            return self._call(name, mb["rows"], mb["prompts"], mb["comps"])
        parts = [self._call(n, mb["rows"], mb["prompts"], mb["comps"]) for n in self.names]
        if parts[0] is None:  # not the last pipeline stage
            return None
        lengths = [len(c) for c in mb["comps"]]
        mode, lp_MN, rows_MR = self.m.mixture_weights, None, None
        if mode != "fixed":
            flat = torch.tensor(
                [t for c in mb["comps"] for t in c], dtype=torch.long, device=self.groups.device
            )
            group = self._group(self.names[0])
            lp_MN = torch.stack([token_stats(p, flat, group, self.vocab)[0] for p in parts])
            bounds = torch.tensor([0, *lengths]).cumsum(0).tolist()
            rows_MR = torch.stack(
                [torch.stack([x[a:b].mean() for a, b in zip(bounds[:-1], bounds[1:])]) for x in lp_MN]
            )
        w_MN = mixture_weights(mode, self.fixed_weights, lengths, rows_MR, lp_MN, self.m.mixture_temperature)
        return MixtureTargets(parts, w_MN.to(self.groups.device))

    def score(self, mbs: list[dict]) -> None:
        """Fill ``mb["teacher"]`` of every micro-batch; raises :class:`StepAborted` on every rank when a
        teacher failed on any."""
        failure: tuple[str, str] | None = None
        # Remote teachers run in threads only where no TP collective is involved (a TP peer broadcast
        # inside a thread could interleave with the co-located teachers' collectives).
        remote = [
            i
            for i, mb in enumerate(mbs)
            if mb["teacher_name"] != MIXTURE and is_remote(self.teachers[mb["teacher_name"]])
        ]
        concurrent = remote if self.groups.tp_size == 1 else []
        with ThreadPoolExecutor(max_workers=max(1, min(8, len(concurrent)))) as pool:
            futures = {i: pool.submit(self._score_mb, mbs[i]) for i in concurrent}
            for i, mb in enumerate(mbs):
                if i in futures:
                    continue
                try:
                    mb["teacher"] = self._score_mb(mb)
                except TeacherError as e:
                    failure = failure or (mb["teacher_name"], str(e))
                    break
            for i, fut in futures.items():
                try:
                    mbs[i]["teacher"] = fut.result()
                except TeacherError as e:
                    failure = failure or (mbs[i]["teacher_name"], str(e))
        # Every rank learns whether any rank failed, so none of them steps alone.
        if not all_finite(0.0 if failure is None else float("nan"), self.groups):
            if failure is None:
                raise StepAborted(None, "a teacher failed on another rank")
            raise StepAborted(*failure)
        for mb in mbs:
            names = self.names if mb["teacher_name"] == MIXTURE else [mb["teacher_name"]]
            for n in names:
                self.rollouts[n] += len(mb["rows"])
                self.tokens[n] += sum(len(c) for c in mb["comps"])

    # ------------------------------------------------------------------ disagreement
    def dense_same_vocab(self) -> list[str]:
        return [
            n
            for n, t in self.teachers.items()
            if getattr(t, "dense", False) and not isinstance(t, CrossTokenizerTeacher)
        ]

    @torch.no_grad()
    def disagreement(self, mbs: list[dict]) -> float | None:
        """Mean per-token JS divergence between the co-located same-vocabulary teachers on this step's
        rollouts (mixture weights under mixture routing, uniform otherwise); None with fewer than two."""
        names = self.dense_same_vocab()
        if len(names) < 2:
            return None
        total, count = 0.0, 0
        for mb in mbs:
            if mb["teacher_name"] == MIXTURE:
                tgt = mb["teacher"]
                if tgt is None:
                    continue
                parts, w_MN = tgt.parts, tgt.weights_MN
            else:
                parts = [self._call(n, mb["rows"], mb["prompts"], mb["comps"]) for n in names]
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


def measure_pass_rates(teachers: dict[str, Teacher], eval_rows, student_tok, max_new_tokens: int, limit: int):
    """``{domain: {teacher: greedy exact match}}`` of every co-located teacher on the held-out split (the
    validation table of pass-rate routing). Remote teachers only score, so their rows must be configured."""
    from opd_megatron.train.evaluate import exact_match

    table: dict[str, dict[str, float]] = {d: {} for d in eval_rows}
    for name, t in teachers.items():
        if is_remote(t):
            raise ConfigError(
                "mopd.pass_rates",
                f"teacher {name!r} is remote (a scoring service cannot generate); give its pass rates in "
                "mopd.pass_rates",
            )
        cross = isinstance(t, CrossTokenizerTeacher)
        inner = t.inner if cross else t
        tok = t.teacher_tok if cross else student_tok
        for d, v in exact_match(inner.model, tok, eval_rows, inner.groups, max_new_tokens, limit).items():
            table[d][name] = v
    return table
