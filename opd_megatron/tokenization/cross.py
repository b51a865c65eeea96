"""Batch plan for cross-tokenizer OPD: re-emit student rollouts for a teacher of another tokenizer and map
every student completion token to the teacher completion token it is compared with.

The :class:`~opd_megatron.teachers.base.Teacher` interface returns one target per *teacher* completion
token in row-major order (the target of token ``u`` is the teacher's distribution predicting ``u``). The
plan's ``teacher_index_N`` picks, for each student completion token (row-major), the row of those teacher
targets to compare with: the exactly matching token where ``aligned_N`` (KL / hybrid), else the ULD
partner of :meth:`~opd_megatron.tokenization.alignment.Alignment.fallback_index`, or -1 (no target).
"""

from __future__ import annotations

import bisect
import contextlib
from dataclasses import dataclass

import torch

from opd_megatron.tokenization.alignment import Alignment, align_completion, alignment_stats
from opd_megatron.tokenization.base import Tokenizer, TokenizerError
from opd_megatron.tokenization.chat_templates import ChatTemplate, reemit, reemit_completion

__all__ = [
    "CrossTokenizerPlan",
    "PrefixProjector",
    "canonical_token_ids",
    "covering_teacher_tokens",
    "first_token_projection",
    "plan_cross_tokenizer",
]


@dataclass
class CrossTokenizerPlan:
    teacher_prompt_ids: list[list[int]]
    teacher_completion_ids: list[list[int]]
    alignments: list[Alignment]
    aligned_N: torch.Tensor
    """Bool, one per student completion token (row-major): the token receives the KL."""
    teacher_index_N: torch.Tensor
    """Long, one per student completion token: row of the teacher's row-major completion targets, or -1."""
    context_N: torch.Tensor
    """Bool, one per student completion token: the token starts where a teacher token starts, so both
    models condition on the same text before it. A superset of ``aligned_N``."""
    prefix_N: list[bytes]
    """Per student completion token: the bytes of its teacher token already consumed before the student
    token starts (``b""`` where ``context_N``). The teacher's prediction of its token, restricted to tokens
    that begin with these bytes, predicts the student's token (see :class:`PrefixProjector`)."""

    def stats(self) -> dict[str, float]:
        return alignment_stats(self.alignments)


def plan_cross_tokenizer(
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    student_tok: Tokenizer,
    student_tpl: ChatTemplate,
    teacher_tok: Tokenizer,
    teacher_tpl: ChatTemplate,
    teacher_prompt_ids: list[list[int]] | None = None,
) -> CrossTokenizerPlan:
    """Re-emit each rollout under the teacher's template and tokenizer, then align its completion.

    ``teacher_prompt_ids`` given (the teacher's own rendering of each row's prompt, for data whose prompts
    are not chat-formatted): only the completions are re-emitted; otherwise the prompt's turns are
    stripped of the student's template and re-rendered under the teacher's."""
    t_prompts, t_completions, alignments, aligned, index, context, prefixes = [], [], [], [], [], [], []
    offset = 0  # rows of the teacher's completion targets before this rollout
    for i, (p_ids, c_ids) in enumerate(zip(prompt_ids, completion_ids)):
        if teacher_prompt_ids is None:
            r = reemit(p_ids, c_ids, student_tok, student_tpl, teacher_tok, teacher_tpl)
            t_prompt, t_completion = r.teacher_prompt_ids, r.teacher_completion_ids
        else:
            t_prompt = teacher_prompt_ids[i]
            _, _, t_completion = reemit_completion(c_ids, student_tok, student_tpl, teacher_tok, teacher_tpl)
        a = align_completion(student_tok, list(c_ids), teacher_tok, t_completion)
        t_prompts.append(t_prompt)
        t_completions.append(t_completion)
        alignments.append(a)
        aligned += a.mask
        rows, starts, prefix = covering_teacher_tokens(a)
        _dummy_as_prefix(teacher_tok, t_completion, a, rows, prefix)
        index += [offset + u if u >= 0 else -1 for u in rows]
        context += starts
        prefixes += prefix
        offset += len(t_completion)
    return CrossTokenizerPlan(
        t_prompts,
        t_completions,
        alignments,
        torch.tensor(aligned, dtype=torch.bool),
        torch.tensor(index, dtype=torch.long),
        torch.tensor(context, dtype=torch.bool),
        prefixes,
    )


def _dummy_as_prefix(
    teacher_tok: Tokenizer, t_ids: list[int], a: Alignment, rows: list[int], prefix: list[bytes]
):
    """A teacher with a dummy prefix (SentencePiece ``add_dummy_prefix``) starts its completion with a
    token like ``"▁The"`` whose ``"▁"`` is no text (the alignment reads it as ``"The"``). Its prediction of
    that token is over tokens that all carry the dummy space, so the student token it covers gets the dummy
    as its consumed prefix: the projection then strips it (``"▁The"`` counts for the student's ``"The"``)."""
    if not teacher_tok.dummy_prefix:
        return
    full = teacher_tok.token_bytes(t_ids)
    k = next((j for j, b in enumerate(a.teacher_bytes) if b != full[j] or b), None)
    if k is None or a.teacher_bytes[k] == full[k]:
        return  # the first token with bytes kept its "▁": it is the text's own space
    for t, (u, c) in enumerate(zip(rows, prefix)):
        if u == k and c == b"" and a.student_bytes[t]:
            prefix[t] = teacher_tok.dummy_prefix
            return


def covering_teacher_tokens(a: Alignment) -> tuple[list[int], list[bool], list[bytes]]:
    """Per student token of ``a``: the teacher token whose prediction it is compared with, whether the two
    share their context, and the bytes of that teacher token consumed before the student token starts.

    A student token starting at byte ``o`` is paired with the teacher token covering ``o`` (its start
    ``<= o <`` its end); both condition on ``text[:start]`` and the student has already emitted
    ``text[start:o]``. Zero-length (special) tokens keep their alignment group's pairing (EOS <-> the
    teacher's end-of-turn). Student bytes beyond the teacher's text (a rollout cut inside a character)
    pair with nothing (-1)."""
    fallback = a.fallback_index()
    t_spans = [(s, e, j) for j, (s, e) in enumerate(a.teacher_spans) if e > s]
    t_starts = [s for s, _, _ in t_spans]
    text = a.text
    rows, starts, prefixes = [], [], []
    for t, (so, eo) in enumerate(a.student_spans):
        k = bisect.bisect_right(t_starts, so) - 1
        if eo == so or k < 0 or not t_spans[k][0] <= so < t_spans[k][1]:
            u = fallback[t] if eo == so else -1
            rows.append(u)
            starts.append(u >= 0)
            prefixes.append(b"")
            continue
        start, _, j = t_spans[k]
        rows.append(j)
        starts.append(start == so)
        prefixes.append(text[start:so])
    return rows, starts, prefixes


class PrefixProjector:
    r"""Maps a teacher's next-token distribution onto the student's next token, given the bytes of the
    teacher token the student has already emitted.

    With prefix ``c`` (bytes), teacher token ``w`` counts for student token :math:`\pi_c(w)`: the longest
    student token that is a prefix of ``w`` with ``c`` removed, provided ``w`` starts with ``c`` and is
    longer than it (else ``w`` is excluded, -1). With ``c = b""`` this is
    :func:`first_token_projection`, where special tokens also map (by role, by identical spelling, and
    through ``special_pairs``). The projected distribution is

    .. math:: \tilde p_c(v) = \frac{\sum_{w: \pi_c(w) = v} p_T(w)}{\sum_{w: \pi_c(w) \ge 0} p_T(w)},

    the teacher's belief about the student's next token, conditioned on the bytes already emitted.
    Maps are cached per prefix."""

    def __init__(self, student_tok: Tokenizer, teacher_tok: Tokenizer, special_pairs=()):
        self._by_bytes = canonical_token_ids(student_tok)
        self._longest = max((len(b) for b in self._by_bytes), default=0)
        specials = teacher_tok.special_ids
        self._teacher_bytes = [
            b"" if w in specials else b
            for w, b in enumerate(teacher_tok.token_bytes(list(range(teacher_tok.vocab_size))))
        ]
        self._cache: dict[bytes, torch.Tensor] = {}
        base = self(b"")
        for s_id, t_id in [*_special_pairs(student_tok, teacher_tok), *special_pairs]:
            base[t_id] = s_id

    def __call__(self, prefix: bytes) -> torch.Tensor:
        """``[W]`` long: the student token each teacher token counts for after ``prefix``, or -1."""
        out = self._cache.get(prefix)
        if out is None:
            out = torch.full((len(self._teacher_bytes),), -1, dtype=torch.long)
            n = len(prefix)
            for w, b in enumerate(self._teacher_bytes):
                if len(b) > n and b.startswith(prefix):
                    rest = b[n:]
                    for m in range(min(len(rest), self._longest), 0, -1):
                        v = self._by_bytes.get(rest[:m])
                        if v is not None:
                            out[w] = v
                            break
            self._cache[prefix] = out
        return out


def canonical_token_ids(tok: Tokenizer) -> dict[bytes, int]:
    """Bytes -> the id ``tok`` itself uses for them, over its non-special tokens. Where several ids spell
    the same bytes (a SentencePiece piece and its byte-fallback twin ``<0x31>`` for ``"1"``), the one the
    tokenizer produces when encoding that text wins, else the highest id (SentencePiece numbers its
    byte-fallback pieces before the learned ones): a target on the twin would teach the student a token it
    never emits, after which it has never seen any context."""
    groups: dict[bytes, list[int]] = {}
    for i, b in enumerate(tok.token_bytes(list(range(tok.vocab_size)))):
        if b and i not in tok.special_ids:
            groups.setdefault(b, []).append(i)
    out = {}
    for b, ids in groups.items():
        enc: list[int] = []
        if len(ids) > 1:
            with contextlib.suppress(UnicodeDecodeError, TokenizerError):  # bytes that are not text
                enc = tok.encode(b.decode("utf-8"))
        out[b] = enc[0] if len(enc) == 1 and enc[0] in ids else ids[-1]
    return out


def _special_pairs(student_tok: Tokenizer, teacher_tok: Tokenizer) -> list[tuple[int, int]]:
    """(student id, teacher id) of specials with the same role (pad, BOS, EOS) or the same spelling."""
    pairs = [
        (a, b)
        for a, b in ((student_tok.pad_id, teacher_tok.pad_id), (student_tok.bos_id, teacher_tok.bos_id),
                     (student_tok.eos_id, teacher_tok.eos_id))
        if a is not None and b is not None
    ]  # fmt: skip
    s_text = {student_tok.special_token_text(i): i for i in student_tok.special_ids}
    for w in teacher_tok.special_ids:
        text = teacher_tok.special_token_text(w)
        if text is not None and text in s_text:
            pairs.append((s_text[text], w))
    return pairs


def first_token_projection(
    student_tok: Tokenizer, teacher_tok: Tokenizer, special_pairs: tuple[tuple[int, int], ...] = ()
) -> torch.Tensor:
    r"""``[W]`` long: for each teacher token, the student token its text starts with (the longest student
    token whose bytes are a prefix of the teacher token's), -1 where none does; special tokens map only
    by role (pad, BOS, EOS), by identical spelling, and through ``special_pairs`` (student id, teacher id),
    e.g. the two end-of-turn tokens.

    Where both models condition on the same text, the teacher's next-token distribution projected this
    way, :math:`\tilde p(v) = \sum_{w: \pi(w) = v} p_T(w)`, is its distribution over the *student's*
    next token: the teacher's "357" and "3" both begin with the student's "3"."""
    return PrefixProjector(student_tok, teacher_tok, special_pairs)(b"")
