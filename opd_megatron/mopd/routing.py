"""Routers: which teacher supervises each rollout.

Specialty and pass-rate routing decide from the prompt's domain label alone, before any teacher runs.
Confidence routing decides after every teacher scored the rollout (Appendix B of the survey: the teacher
that is most sure of the student's own tokens is the one that knows the region the student is in).
"""

from __future__ import annotations

from collections.abc import Sequence

from opd_megatron.config import ConfigError
from opd_megatron.data.jsonl import PromptRow


class SpecialtyRouter:
    """Domain label -> the teacher that lists the domain; unknown domains go to ``default``.

    ``claims`` maps teacher name -> its domains, in the order of the config. Under ``exclusive`` a domain
    claimed twice is a configuration error naming both teachers; otherwise the first claimant wins."""

    def __init__(self, claims: dict[str, Sequence[str]], default: str, exclusive: bool = True):
        if default not in claims:
            raise ConfigError(
                "mopd.default_teacher", f"no teacher named {default!r}; teachers: {list(claims)}"
            )
        self.default = default
        self.table: dict[str, str] = {}
        for teacher, domains in claims.items():
            for d in domains:
                owner = self.table.get(d)
                if owner is not None and exclusive:
                    raise ConfigError(
                        "teachers",
                        f"domain {d!r} is claimed by teacher {owner!r} and by teacher {teacher!r}; specialty "
                        "routing is exclusive (set mopd.exclusive: false to let the first one win)",
                    )
                self.table.setdefault(d, teacher)

    def route(self, rows: Sequence[PromptRow]) -> list[str]:
        return [self.table.get(r.domain, self.default) for r in rows]


class PassRateRouter:
    """Domain -> the teacher with the best validation pass rate on it (``rates[domain][teacher]``; ties go
    to the teacher listed first in ``order``); domains without a row go to ``default``."""

    def __init__(self, rates: dict[str, dict[str, float]], order: Sequence[str], default: str):
        unknown = sorted({t for r in rates.values() for t in r} - set(order))
        if unknown:
            raise ConfigError("mopd.pass_rates", f"unknown teacher(s) {unknown}; teachers: {list(order)}")
        if default not in order:
            raise ConfigError(
                "mopd.default_teacher", f"no teacher named {default!r}; teachers: {list(order)}"
            )
        rank = {t: i for i, t in enumerate(order)}
        self.default = default
        self.table = {
            d: max(r, key=lambda t: (r[t], -rank[t])) for d, r in rates.items() if r
        }  # highest rate, then earliest teacher

    def route(self, rows: Sequence[PromptRow]) -> list[str]:
        return [self.table.get(r.domain, self.default) for r in rows]


class ConfidenceRouter:
    """Per rollout, the teacher with the highest confidence score (ties: the teacher listed first).

    Scores are per teacher and rollout, higher meaning more confident: the mean log-prob of the rollout's
    tokens, or minus the mean entropy (see :func:`~opd_megatron.mopd.mixing.rollout_confidence`)."""

    def choose(self, scores: dict[str, Sequence[float]]) -> list[str]:
        names = list(scores)
        n = len(next(iter(scores.values()), []))
        if any(len(v) != n for v in scores.values()):
            raise ValueError(
                f"every teacher must score every rollout; got {[len(v) for v in scores.values()]}"
            )
        return [max(names, key=lambda t: (scores[t][i], -names.index(t))) for i in range(n)]
