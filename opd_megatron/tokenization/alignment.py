r"""Boundary-agreement alignment of one text tokenised by two tokenizers (student and teacher).

Everything is defined on **byte offsets** of the UTF-8 text: byte-level tokens may end inside a
multi-byte character, where character offsets do not exist. Each token covers a byte span; the spans of
one tokenisation tile the text (special tokens such as EOS cover the empty span where they stand).

- A *common boundary* is a byte offset where both tokenisations end a token (offset 0 counts too).
- *Groups* cut both token sequences at every common boundary: group ``g`` holds student tokens
  ``[i0, i1)`` and teacher tokens ``[j0, j1)`` covering the same bytes. 1:1 groups are exact matches;
  ``n:1`` / ``1:m`` / ``n:m`` groups are where the tokenizers split the text differently. Zero-length
  tokens at one offset pair up 1:1 when both sides have the same number (student EOS <-> teacher
  end-of-turn), else they form one group.
- The *mask* marks student token ``t`` iff its group is 1:1: the token starts *and* ends on a common
  boundary with no other boundary between, so both models condition on the same text ``x[:start_t]``
  and predict a token covering the same text ``x[start_t:end_t]``.

**Next-token shift.** Logits at sequence position ``r`` predict token ``r + 1``. For completion token
``t`` (student) matched to teacher completion token ``u``, the student distribution is at row
``P_s + t - 1`` of the student's full-sequence logits and the teacher's at row ``P_t + u - 1`` (``P`` =
prompt length), see :meth:`Alignment.student_rows` / :meth:`Alignment.teacher_rows`. Selecting the row
of the token whose *end* agrees (``P + t``) instead, as one known peer implementation does by default,
compares each distribution with the teacher's prediction of the *following* token.

If the two byte strings differ (a rollout cut inside a character is re-emitted with U+FFFD), only
boundaries within their common prefix count; the rest forms one final unaligned group.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

from opd_megatron.tokenization.base import Tokenizer, char_offsets_from_bytes, spans_from_lengths

__all__ = [
    "CONTENT_CLASSES",
    "Alignment",
    "Group",
    "align_bytes",
    "align_completion",
    "alignment_stats",
    "classify_tokens",
    "rate_by_position",
]

CONTENT_CLASSES = ("prose", "digits", "code", "nonascii")


@dataclass(frozen=True)
class Group:
    student: tuple[int, int]
    """Student token index range ``[i0, i1)``."""
    teacher: tuple[int, int]
    """Teacher token index range ``[j0, j1)``."""
    span: tuple[int, int]
    """Byte span the group covers (of the student's text when the texts differ)."""
    exact: bool
    """The group ends on a common boundary (false only for a final group over differing bytes)."""

    @property
    def shape(self) -> tuple[int, int]:
        return self.student[1] - self.student[0], self.teacher[1] - self.teacher[0]

    @property
    def aligned(self) -> bool:
        return self.exact and self.shape == (1, 1)


@dataclass
class Alignment:
    student_bytes: list[bytes]
    teacher_bytes: list[bytes]
    groups: list[Group]
    mask: list[bool]
    """Per student token: it receives the KL (its group is 1:1)."""
    teacher_index: list[int]
    """Per student token: the matching teacher token, or -1 where the mask is false."""
    common_boundaries: list[int]

    @property
    def text(self) -> bytes:
        return b"".join(self.student_bytes)

    @property
    def student_spans(self) -> list[tuple[int, int]]:
        return spans_from_lengths([len(b) for b in self.student_bytes])

    @property
    def teacher_spans(self) -> list[tuple[int, int]]:
        return spans_from_lengths([len(b) for b in self.teacher_bytes])

    def student_char_spans(self) -> list[tuple[int, int] | None]:
        """Character spans of the student tokens; ``None`` where a token starts/ends inside a character."""
        text = self.text.decode("utf-8", errors="replace")
        return char_offsets_from_bytes(text, self.student_spans) if text.encode() == self.text else []

    def teacher_char_spans(self) -> list[tuple[int, int] | None]:
        text_b = b"".join(self.teacher_bytes)
        text = text_b.decode("utf-8", errors="replace")
        return char_offsets_from_bytes(text, self.teacher_spans) if text.encode() == text_b else []

    @property
    def rate(self) -> float:
        """Fraction of student tokens that receive the KL (1.0 for an empty completion)."""
        return sum(self.mask) / len(self.mask) if self.mask else 1.0

    def fallback_index(self) -> list[int]:
        """Per student token, the teacher token whose distribution a ULD fallback compares with: the
        matched token where aligned; inside an unaligned group the ``k``-th student token pairs with the
        ``min(k, m - 1)``-th of the group's ``m`` teacher tokens (the first pair shares its context exactly,
        later pairs only approximately, which is all a shape-only distance needs); -1 where the group
        has no teacher token."""
        out = [-1] * len(self.mask)
        for g in self.groups:
            n, m = g.shape
            for k in range(n):
                out[g.student[0] + k] = g.teacher[0] + min(k, m - 1) if m else -1
        return out

    def student_rows(self, student_prompt_len: int) -> list[int]:
        """Rows of the student's full-sequence logits for the masked tokens (row r predicts token r+1)."""
        return [student_prompt_len + t - 1 for t, m in enumerate(self.mask) if m]

    def teacher_rows(self, teacher_prompt_len: int) -> list[int]:
        """Rows of the teacher's full-sequence logits matching :meth:`student_rows`, in the same order."""
        return [teacher_prompt_len + u - 1 for u, m in zip(self.teacher_index, self.mask) if m]


def align_bytes(student_bytes: list[bytes], teacher_bytes: list[bytes]) -> Alignment:
    """Align two tokenisations given as the bytes of each token (``b""`` for special tokens)."""
    ls, lt = [len(b) for b in student_bytes], [len(b) for b in teacher_bytes]
    ns, nt = len(ls), len(lt)
    text_s, text_t = b"".join(student_bytes), b"".join(teacher_bytes)
    common = 0  # length of the common byte prefix: boundaries beyond it do not describe the same text
    while common < min(len(text_s), len(text_t)) and text_s[common] == text_t[common]:
        common += 1
    groups: list[Group] = []
    boundaries = [0] if ns or nt else []
    i = j = ps = pt = 0
    while i < ns or j < nt:
        zi = next((k for k in range(i, ns) if ls[k]), ns) - i  # zero-length tokens at this boundary
        zj = next((k for k in range(j, nt) if lt[k]), nt) - j
        if zi or zj:
            if zi == zj:
                groups += [Group((i + k, i + k + 1), (j + k, j + k + 1), (ps, ps), True) for k in range(zi)]
            else:
                groups.append(Group((i, i + zi), (j, j + zj), (ps, ps), True))
            i, j = i + zi, j + zj
            continue
        gi, gj, start = i, j, ps
        while True:
            can_s, can_t = i < ns, j < nt
            if can_s and (ps <= pt or not can_t):
                ps, i = ps + ls[i], i + 1
            elif can_t:
                pt, j = pt + lt[j], j + 1
            if ps == pt <= common or (i == ns and j == nt):
                break
        exact = ps == pt <= common
        if exact:
            boundaries.append(ps)
        groups.append(Group((gi, i), (gj, j), (start, ps), exact))
    mask, teacher_index = [False] * ns, [-1] * ns
    for g in groups:
        if g.aligned:
            mask[g.student[0]], teacher_index[g.student[0]] = True, g.teacher[0]
    return Alignment(list(student_bytes), list(teacher_bytes), groups, mask, teacher_index, boundaries)


def align_completion(
    student_tok: Tokenizer, student_ids: list[int], teacher_tok: Tokenizer, teacher_ids: list[int]
) -> Alignment:
    """Align a student completion (the ids it sampled, not a re-encoding) with the teacher's ids.

    Both are read as the start of a text (:meth:`~opd_megatron.tokenization.base.Tokenizer.text_bytes`):
    a SentencePiece dummy-prefix space on either side's first token is no part of the completion's text,
    so it neither shifts every offset nor makes the two texts differ. The one ambiguous case, a ``"▁"``
    that is the text's own leading space (Hugging Face ``Metaspace`` adds no dummy before a space), is
    settled by the other side: when its text has that space, the space is the first token's."""
    s_bytes, t_bytes = student_tok.text_bytes(student_ids), teacher_tok.text_bytes(teacher_ids)
    s_text, t_text = b"".join(s_bytes), b"".join(t_bytes)
    if teacher_tok.dummy_prefix and s_text == teacher_tok.dummy_prefix + t_text:
        t_bytes = teacher_tok.token_bytes(teacher_ids)
    elif student_tok.dummy_prefix and t_text == student_tok.dummy_prefix + s_text:
        s_bytes = student_tok.token_bytes(student_ids)
    return align_bytes(s_bytes, t_bytes)


_CODE_CHARS = frozenset("{}[]();=<>_\\/|&*^%$#@`~\t")


def classify_tokens(token_bytes: list[bytes]) -> list[str]:
    """Content class of each token, for sliced alignment rates: ``nonascii`` (any byte >= 0x80),
    ``digits`` (any digit), ``code`` (inside a ``` fence, code punctuation, or indentation of 4+
    spaces), else ``prose``. Special tokens take the class of the token before them."""
    text = b"".join(token_bytes)
    fences = [m.start() for m in re.finditer(rb"```", text)]
    classes, last = [], "prose"
    for (start, _), b in zip(spans_from_lengths([len(b) for b in token_bytes]), token_bytes):
        in_fence = bisect.bisect_right(fences, start) % 2 == 1  # an odd number of fences opened before
        chars = b.decode("utf-8", errors="replace")
        if not b:
            cls = last
        elif any(x >= 0x80 for x in b):
            cls = "nonascii"
        elif any(c.isdigit() for c in chars):
            cls = "digits"
        elif in_fence or any(c in _CODE_CHARS for c in chars) or "    " in chars:
            cls = "code"
        else:
            cls = "prose"
        classes.append(cls)
        last = cls
    return classes


def alignment_stats(alignments: list[Alignment]) -> dict[str, float]:
    """Aligned fraction of student tokens overall and per content class, plus group-shape counts.

    Keys: ``align/rate``, ``align/rate_<class>`` (NaN where a class has no tokens), ``align/tokens``,
    ``align/tokens_<class>``, ``align/groups_1to1``, ``align/groups_split`` (student finer, 1 teacher
    token), ``align/groups_merge`` (student coarser), ``align/groups_other``."""
    total = {c: 0 for c in CONTENT_CLASSES}
    hit = {c: 0 for c in CONTENT_CLASSES}
    shapes = {"1to1": 0, "split": 0, "merge": 0, "other": 0}
    for a in alignments:
        for cls, m in zip(classify_tokens(a.student_bytes), a.mask):
            total[cls] += 1
            hit[cls] += m
        for g in a.groups:
            n, m = g.shape
            key = (
                "1to1"
                if g.aligned
                else "split"
                if m == 1 and n > 1
                else "merge"
                if n == 1 and m > 1
                else "other"
            )
            shapes[key] += 1
    n_all = sum(total.values())
    out = {"align/rate": sum(hit.values()) / n_all if n_all else float("nan"), "align/tokens": float(n_all)}
    for c in CONTENT_CLASSES:
        out[f"align/rate_{c}"] = hit[c] / total[c] if total[c] else float("nan")
        out[f"align/tokens_{c}"] = float(total[c])
    out.update({f"align/groups_{k}": float(v) for k, v in shapes.items()})
    return out


def rate_by_position(alignments: list[Alignment], bucket: int = 16) -> list[float]:
    """Aligned fraction per completion-position bucket (``[0, bucket)``, ``[bucket, 2 bucket)``, ...): the
    per-position alignment-rate curve, which should stay flat over training."""
    hits: list[int] = []
    counts: list[int] = []
    for a in alignments:
        for t, m in enumerate(a.mask):
            k = t // bucket
            while len(counts) <= k:
                hits.append(0)
                counts.append(0)
            hits[k] += m
            counts[k] += 1
    return [h / c for h, c in zip(hits, counts)]
