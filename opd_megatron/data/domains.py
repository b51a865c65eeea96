"""Built-in synthetic domains with exact verifiers: the embedded demo and test bed of the pipeline.

Each domain is small enough that a tiny transformer learns it in a few hundred SFT steps at the default
difficulty 3, and each has an exact verifier, so distillation runs report accuracy, not only loss.
Measured with a 2-layer, 128-wide causal transformer trained on one domain (batch 32, AdamW 3e-3),
held-out exact match after 400 steps: reversal 100%, sorting 77%, addition 51% (77% after 500 steps).

Prompt formats (every prompt ends with ``=``; the completion is the answer, then EOS):

=========== ========================= ================ ========================================================
domain      prompt                    reference        ``difficulty = d`` means
=========== ========================= ================ ========================================================
addition    ``add 123+045=``          ``0168``         operands of 1..d digits (uniform), zero-padded to d digits
reversal    ``reverse abc=``          ``cba``          1..d lowercase letters (uniform)
sorting     ``sort 3141=``            ``1134``         2..d+2 digits (uniform), sorted ascending
=========== ========================= ================ ========================================================

Sorting uses two more digits than ``d`` because digit strings are a small space: with at most 3 digits
there are only 1,110 prompts, too few for the default 2,000 training rows. Drawing the length uniformly
(rather than drawing a uniform prompt) keeps short, easy cases common, which is what lets a tiny model
pick a task up quickly.

``privileged`` holds what a self-distillation teacher may see: the worked steps and the answer.

Train/eval split: a prompt belongs to the eval split iff a hash of its text falls in 1 of
:data:`EVAL_BUCKETS` buckets (about 10% of every domain's prompt space). The split of a prompt thus
never depends on seeds or sizes, so held-out prompts stay held out across runs, and rows generated for
one split can never appear in the other.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import itertools
import random
import re
import string
from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal

from opd_megatron.data.rows import DataError, PromptRow
from opd_megatron.data.sources import read_rows

if TYPE_CHECKING:
    from opd_megatron.config import DataConfig

__all__ = [
    "DOMAINS",
    "EVAL_BUCKETS",
    "Domain",
    "build_datasets",
    "build_split",
    "get_domain",
    "split_of",
    "verify",
]

Split = Literal["train", "eval"]

EVAL_BUCKETS = 10
"""A prompt is held out for evaluation iff its hash is 0 modulo this (about 1 prompt in 10)."""

_ENUMERATE_LIMIT = 200_000
"""Up to this many prompts a domain's space is enumerated when a split asks for a large part of it."""


def _shorten(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


class Domain(abc.ABC):
    """A family of prompts with a known answer: a generator, a parser and an exact verifier."""

    name: str
    description: str

    @abc.abstractmethod
    def generate(self, rng: random.Random, difficulty: int) -> PromptRow:
        """One random row (prompt, reference, privileged) at this difficulty."""

    @abc.abstractmethod
    def row_for(self, prompt: str) -> PromptRow:
        """The full row of a prompt in this domain's format; :class:`DataError` if it is not one."""

    @abc.abstractmethod
    def prompt_space_size(self, difficulty: int) -> int:
        """Number of distinct prompts :meth:`generate` can produce at this difficulty."""

    @abc.abstractmethod
    def enumerate_prompts(self, difficulty: int) -> Iterator[str]:
        """Every prompt of this difficulty, in a fixed order (only used for small spaces)."""

    def verify(self, row_or_prompt: PromptRow | str, completion: str) -> bool:
        """True iff ``completion``, stripped of surrounding whitespace, is exactly the answer.

        For a row the answer is its ``reference`` when present (else it is solved from the prompt); for
        a bare prompt it is solved from the prompt text.
        """
        if isinstance(row_or_prompt, PromptRow):
            if row_or_prompt.domain != self.name:
                raise DataError(
                    f"the {self.name} verifier got a row of domain {row_or_prompt.domain!r} "
                    f"(prompt {_shorten(row_or_prompt.prompt)!r})"
                )
            expected = row_or_prompt.reference
            if expected is None:
                expected = self.row_for(row_or_prompt.prompt).reference
        else:
            expected = self.row_for(row_or_prompt).reference
        return completion.strip() == expected.strip()

    def _parse(self, pattern: re.Pattern, prompt: str, example: str) -> re.Match:
        m = pattern.fullmatch(prompt)
        if m is None:
            raise DataError(f"not a {self.name} prompt: {_shorten(prompt)!r} (expected the form {example!r})")
        return m

    def __repr__(self) -> str:
        return f"<domain {self.name}>"


class Addition(Domain):
    """``add 123+045=`` -> ``0168``: operands zero-padded to ``d`` digits, the sum to ``d + 1``.

    Each operand's digit count is drawn uniformly from 1..d, then its value uniformly among numbers of
    that many digits. Fixed-width columns are what make this learnable for a tiny model: digit ``i`` of
    every prompt sits at the same position, so attention can line the columns up. In the same
    measurement the unpadded form (``add 123+45=`` -> ``168``) was still at 6% after 600 steps, this
    one at 77% after 500.
    """

    name = "addition"
    description = "sum of two d-digit (zero-padded) numbers, written with d+1 digits"
    _pattern = re.compile(r"add ([0-9]+)\+([0-9]+)=")

    @staticmethod
    def _operand(rng: random.Random, difficulty: int) -> int:
        n = rng.randint(1, difficulty)
        return rng.randint(0, 9) if n == 1 else rng.randint(10 ** (n - 1), 10**n - 1)

    def generate(self, rng: random.Random, difficulty: int) -> PromptRow:
        return self._row(self._operand(rng, difficulty), self._operand(rng, difficulty), difficulty)

    def row_for(self, prompt: str) -> PromptRow:
        m = self._parse(self._pattern, prompt, "add 123+045=")
        # Hand-written prompts may mix widths: the wider operand sets the width.
        width = max(len(m.group(1)), len(m.group(2)))
        row = self._row(int(m.group(1)), int(m.group(2)), width)
        return dataclasses.replace(row, prompt=prompt)

    def _row(self, a: int, b: int, width: int) -> PromptRow:
        answer = f"{a + b:0{width + 1}d}"
        # Column addition from the right with the carries spelled out: the steps a teacher would "think".
        da, db = f"{a:0{width}d}"[::-1], f"{b:0{width}d}"[::-1]
        steps, carry = [], 0
        for x, y in zip(map(int, da), map(int, db)):
            s = x + y + carry
            steps.append(f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={s}")
            carry = s // 10
        privileged = f"columns from the right: {', '.join(steps)}; answer: {answer}"
        prompt = f"add {a:0{width}d}+{b:0{width}d}="
        return PromptRow(prompt=prompt, domain=self.name, reference=answer, privileged=privileged)

    def prompt_space_size(self, difficulty: int) -> int:
        return (10**difficulty) ** 2

    def enumerate_prompts(self, difficulty: int) -> Iterator[str]:
        n = 10**difficulty
        return (f"add {a:0{difficulty}d}+{b:0{difficulty}d}=" for a in range(n) for b in range(n))


class Reversal(Domain):
    """``reverse abc=`` -> ``cba``: 1..d lowercase letters, the length drawn uniformly."""

    name = "reversal"
    description = "a string of 1..d lowercase letters, reversed"
    _pattern = re.compile(r"reverse ([a-z]+)=")

    def generate(self, rng: random.Random, difficulty: int) -> PromptRow:
        n = rng.randint(1, difficulty)
        return self._row("".join(rng.choices(string.ascii_lowercase, k=n)))

    def row_for(self, prompt: str) -> PromptRow:
        return self._row(self._parse(self._pattern, prompt, "reverse abc=").group(1))

    def _row(self, s: str) -> PromptRow:
        answer = s[::-1]
        privileged = f"from the end: {', '.join(answer)}; answer: {answer}"
        return PromptRow(prompt=f"reverse {s}=", domain=self.name, reference=answer, privileged=privileged)

    def prompt_space_size(self, difficulty: int) -> int:
        return sum(26**n for n in range(1, difficulty + 1))

    def enumerate_prompts(self, difficulty: int) -> Iterator[str]:
        for n in range(1, difficulty + 1):
            for letters in itertools.product(string.ascii_lowercase, repeat=n):
                yield f"reverse {''.join(letters)}="


class Sorting(Domain):
    """``sort 3141=`` -> ``1134``: 2..d+2 digits, the length drawn uniformly."""

    name = "sorting"
    description = "a string of 2..d+2 digits, sorted ascending"
    _pattern = re.compile(r"sort ([0-9]+)=")

    def generate(self, rng: random.Random, difficulty: int) -> PromptRow:
        n = rng.randint(2, difficulty + 2)
        return self._row("".join(rng.choices(string.digits, k=n)))

    def row_for(self, prompt: str) -> PromptRow:
        return self._row(self._parse(self._pattern, prompt, "sort 3141=").group(1))

    def _row(self, s: str) -> PromptRow:
        answer = "".join(sorted(s))
        # A counting sort: how often each digit occurs, which is all the answer depends on.
        counts = ", ".join(f"{d}:{s.count(d)}" for d in sorted(set(s)))
        privileged = f"counts {counts}; answer: {answer}"
        return PromptRow(prompt=f"sort {s}=", domain=self.name, reference=answer, privileged=privileged)

    def prompt_space_size(self, difficulty: int) -> int:
        return sum(10**n for n in range(2, difficulty + 3))

    def enumerate_prompts(self, difficulty: int) -> Iterator[str]:
        for n in range(2, difficulty + 3):
            for digits in itertools.product(string.digits, repeat=n):
                yield f"sort {''.join(digits)}="


DOMAINS: dict[str, Domain] = {d.name: d for d in (Addition(), Reversal(), Sorting())}
"""The built-in domains by name."""


def get_domain(name: str) -> Domain:
    """The built-in domain ``name``; :class:`DataError` listing the known ones otherwise."""
    try:
        return DOMAINS[name]
    except KeyError:
        raise DataError(f"unknown built-in domain {name!r}; built-in domains: {', '.join(DOMAINS)}") from None


def verify(row: PromptRow, completion: str) -> bool:
    """Check ``completion`` with the verifier of ``row.domain``.

    Rows of other domains are fine as training data, but have nothing to verify them: that is an error
    here rather than a silent ``False``, which would read as a wrong answer.
    """
    if row.domain not in DOMAINS:
        raise DataError(
            f"no verifier for domain {row.domain!r} (prompt {_shorten(row.prompt)!r}); "
            f"only the built-in domains can be verified: {', '.join(DOMAINS)}"
        )
    return DOMAINS[row.domain].verify(row, completion)


def split_of(prompt: str) -> Split:
    """The split a prompt belongs to, from a hash of its text alone (stable across runs and machines)."""
    h = int.from_bytes(hashlib.blake2b(prompt.encode("utf-8"), digest_size=8).digest(), "big")
    return "eval" if h % EVAL_BUCKETS == 0 else "train"


def build_split(domain: str, split: Split, size: int, seed: int, difficulty: int) -> list[PromptRow]:
    """``size`` distinct rows of a built-in domain, all from ``split`` (see the module docstring).

    Deterministic in its arguments. A larger ``size`` with the same seed extends the smaller list (except
    when a request takes most of a small split, which is topped up uniformly from the prompts left).
    Raises :class:`DataError` when the split of the prompt space at this difficulty holds fewer than
    ``size`` prompts, saying how many it holds.
    """
    if split not in ("train", "eval"):
        raise DataError(f"split must be 'train' or 'eval', got {split!r}")
    if size < 1:
        raise DataError(f"size must be >= 1, got {size}")
    if difficulty < 1:
        raise DataError(f"difficulty must be >= 1, got {difficulty}")
    dom = get_domain(domain)
    space = dom.prompt_space_size(difficulty)
    share = 1 / EVAL_BUCKETS if split == "eval" else 1 - 1 / EVAL_BUCKETS
    field_name = f"data.{split}_size"

    # When the request is a large part of the split, rejection sampling could take very long (or never
    # end): count the split exactly (small spaces) or refuse (large ones).
    pool = None
    if 3 * size > share * space:
        if space > _ENUMERATE_LIMIT:
            raise DataError(
                f"{domain} at difficulty {difficulty} has {space} prompts, about {int(share * space)} in the "
                f"{split} split; {size} rows is too large a part of it (lower {field_name} below a third of that)"
            )
        pool = [p for p in dom.enumerate_prompts(difficulty) if split_of(p) == split]
        if len(pool) < size:
            raise DataError(
                f"{domain} at difficulty {difficulty} has only {space} distinct prompts, {len(pool)} of them in "
                f"the {split} split, but {size} were asked for (lower {field_name} or raise data.difficulty)"
            )

    # The rng depends on everything but the size, so a larger size extends the same sequence.
    rng = random.Random(f"{domain}/{split}/seed={seed}/difficulty={difficulty}")
    rows: list[PromptRow] = []
    seen: set[str] = set()
    for _ in range(20 * size + 1000):
        if len(rows) == size:
            break
        row = dom.generate(rng, difficulty)
        if row.prompt in seen or split_of(row.prompt) != split:
            continue
        seen.add(row.prompt)
        rows.append(row)
    if len(rows) < size:
        # Happens when the request is most of a small split: top up uniformly from what is left.
        if pool is None:
            raise DataError(
                f"{domain}: drew only {len(rows)} distinct {split} prompts of the {size} asked for at difficulty "
                f"{difficulty}; lower {field_name}"
            )
        rest = [p for p in pool if p not in seen]
        rows.extend(dom.row_for(p) for p in rng.sample(rest, size - len(rows)))
    return rows


def build_datasets(cfg: DataConfig) -> tuple[list[PromptRow], dict[str, list[PromptRow]]]:
    """Training rows and held-out rows by domain for a :class:`~opd_megatron.config.DataConfig`.

    Built-in domains give ``train_size`` / ``eval_size`` rows each; the rows of ``train_path`` /
    ``eval_path`` (JSONL, Parquet or a saved ``datasets`` directory, see
    :func:`~opd_megatron.data.sources.read_rows`) are added, every one validated here, before training
    (eval rows grouped by their ``domain``). Training rows are shuffled with ``cfg.seed`` so domains
    interleave. An eval prompt that also occurs in the training rows is an error: a held-out score on
    seen prompts would be silently inflated.
    """
    train: list[PromptRow] = []
    evals: dict[str, list[PromptRow]] = {}
    for name in cfg.domains:
        train += build_split(name, "train", cfg.train_size, cfg.seed, cfg.difficulty)
        evals[name] = build_split(name, "eval", cfg.eval_size, cfg.seed, cfg.difficulty)
    for path, split in ((cfg.train_path, "train"), (cfg.eval_path, "eval")):
        if path is None:
            continue
        rows = read_rows(
            path, cfg.fields, cfg.extra_fields, cfg.default_domain, field_name=f"data.{split}_path"
        )
        if not rows:
            raise DataError(f"data.{split}_path: {path} holds no rows")
        if split == "train":
            train += rows
        else:
            for row in rows:
                evals.setdefault(row.domain, []).append(row)

    train_keys = {r.key for r in train}
    leaked = [r for rows in evals.values() for r in rows if r.key in train_keys]
    if leaked:
        raise DataError(
            f"{len(leaked)} eval prompt(s) also occur in the training rows (first: {leaked[0].where()}, "
            f"prompt {_shorten(leaked[0].prompt)!r}); held-out evaluation needs disjoint prompts"
        )
    random.Random(f"build_datasets/seed={cfg.seed}").shuffle(train)
    return train, evals
