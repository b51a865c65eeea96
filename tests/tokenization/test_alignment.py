"""Boundary-agreement alignment: hand-built cases, the next-token shift, and properties over random text."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opd_megatron.tokenization.alignment import (
    align_bytes,
    align_completion,
    alignment_stats,
    classify_tokens,
    rate_by_position,
)


def test_split_differently_and_eos_pairing():
    a = align_bytes([b"ab", b"c", b"d", b""], [b"a", b"bc", b"d", b""])
    assert [(g.student, g.teacher) for g in a.groups] == [
        ((0, 2), (0, 2)),
        ((2, 3), (2, 3)),
        ((3, 4), (3, 4)),
    ]
    assert a.mask == [False, False, True, True]  # "d" and the end-of-turn pair receive the KL
    assert a.teacher_index == [-1, -1, 2, 3]
    assert a.common_boundaries == [0, 3, 4]


def test_many_to_one_and_one_to_many():
    a = align_bytes([b"1", b"2", b"3", b" x", b"yz"], [b"123", b" ", b"x", b"yz"])
    assert [g.shape for g in a.groups] == [(3, 1), (1, 2), (1, 1)]
    assert a.mask == [False, False, False, False, True]
    assert alignment_stats([a])["align/groups_split"] == 1 and alignment_stats([a])["align/groups_merge"] == 1


def test_unpaired_zero_length_tokens():
    a = align_bytes([b"a", b""], [b"a"])  # the student stopped, the teacher text has no end token
    assert [(g.student, g.teacher) for g in a.groups] == [((0, 1), (0, 1)), ((1, 2), (1, 1))]
    assert a.mask == [True, False] and a.fallback_index() == [0, -1]
    a = align_bytes([b"", b""], [b""])
    assert [g.shape for g in a.groups] == [(2, 1)] and a.mask == [False, False]


def test_empty_completion():
    a = align_bytes([], [])
    assert a.groups == [] and a.mask == [] and a.rate == 1.0 and a.student_rows(5) == []
    assert math.isnan(alignment_stats([a])["align/rate"])


def test_multibyte_utf8_split_inside_a_character():
    # byte-level teacher: " \xe6\x97" + "\xa5..." ends inside 日; the student's pieces end on characters
    a = align_bytes([b" ", "日".encode(), "本".encode()], [b" \xe6\x97", b"\xa5\xe6\x9c\xac"])
    assert [g.shape for g in a.groups] == [(3, 2)] and not any(a.mask)
    assert a.student_char_spans() == [(0, 1), (1, 2), (2, 3)]
    assert a.teacher_char_spans() == [None, None]


def test_differing_bytes_end_in_one_unaligned_group():
    # a rollout cut inside a character, re-emitted with U+FFFD: no boundary after the common prefix counts
    a = align_bytes([b"ab", b"\xe6"], [b"ab", "\ufffd".encode(), b""])
    assert a.mask == [True, False] and not a.groups[-1].exact and a.groups[-1].teacher == (1, 3)


def test_teacher_rows_use_the_next_token_shift():
    """A teacher whose logits at row r are one-hot on the token at r + 1 (a perfect predictor) must give,
    at every aligned position, a distribution peaked on the teacher token matching the student's."""
    student = [b"The", b" cat", b" s", b"at", b"."]
    teacher = [b"The", b" cat", b" sat", b"."]
    teacher_prompt = [7, 8, 9]
    teacher_seq = teacher_prompt + [10, 11, 12, 13]  # ids of the teacher completion tokens
    logits_RV = torch.full((len(teacher_seq), 20), -1e9)
    logits_RV[torch.arange(len(teacher_seq) - 1), torch.tensor(teacher_seq[1:])] = 0.0
    a = align_bytes(student, teacher)
    assert a.mask == [True, True, False, False, True]
    rows = a.teacher_rows(len(teacher_prompt))
    assert rows == [2, 3, 5]
    predicted = logits_RV[rows].argmax(-1).tolist()
    assert predicted == [teacher_seq[len(teacher_prompt) + u] for u in (0, 1, 3)]
    # the off-by-one variant (row P + u) predicts the token after the matched one
    assert logits_RV[[r + 1 for r in rows[:-1]]].argmax(-1).tolist() != predicted[:-1]
    assert a.student_rows(4) == [3, 4, 7]


def test_content_classes_and_rates():
    toks = [b"hi", " 日".encode(), b" 12", b"\n```", b"x", b"```", b" y", b""]
    assert classify_tokens(toks) == ["prose", "nonascii", "digits", "code", "code", "code", "prose", "prose"]
    a = align_bytes([b"hi", b" 1", b"2"], [b"hi", b" 12"])
    s = alignment_stats([a])
    assert (
        s["align/rate"] == pytest.approx(1 / 3)
        and s["align/rate_prose"] == 1.0
        and s["align/rate_digits"] == 0.0
    )
    assert math.isnan(s["align/rate_code"])
    assert rate_by_position([a, a], bucket=2) == [0.5, 0.0]


HAND_TEXTS = [
    "The quick brown fox.",
    "  leading spaces",
    "12345 + 678 = 13023",
    "Café 日本語 🙂👍",
    "€ unseen",
    "<|im_start|> is text",
]


@pytest.mark.parametrize("text", HAND_TEXTS)
def test_real_tokenizers_hand_texts(all_toks, text):
    for s_name, t_name in [("sentencepiece", "hf"), ("hf", "tiktoken"), ("tiktoken", "sentencepiece")]:
        s_tok, t_tok = all_toks[s_name], all_toks[t_name]
        s_ids = [*s_tok.encode(text), s_tok.eos_id]
        t_ids = [*t_tok.encode(text), t_tok.eos_id]
        a = align_completion(s_tok, s_ids, t_tok, t_ids)
        _check_invariants(a)
        assert a.mask[-1]  # EOS <-> EOS
        assert a.mask[0] == (s_tok.token_bytes(s_ids[:1]) == t_tok.token_bytes(t_ids[:1]))


def _check_invariants(a):
    ns, nt = len(a.student_bytes), len(a.teacher_bytes)
    s_spans, t_spans = a.student_spans, a.teacher_spans
    # groups partition both sequences, in order
    assert [i for g in a.groups for i in range(*g.student)] == list(range(ns))
    assert [j for g in a.groups for j in range(*g.teacher)] == list(range(nt))
    for g in a.groups:
        # both sides of a group cover the same text
        assert b"".join(a.student_bytes[slice(*g.student)]) == b"".join(a.teacher_bytes[slice(*g.teacher)])
    s_ends = {e for _, e in s_spans} | {0}
    t_ends = {e for _, e in t_spans} | {0}
    assert set(a.common_boundaries) == (s_ends & t_ends if ns or nt else set())
    t_span_set = {span for span, b in zip(t_spans, a.teacher_bytes) if b}
    for t, ((start, end), m) in enumerate(zip(s_spans, a.mask)):
        if end > start:
            # the mask is exactly: the token's span is a teacher token's span (both boundaries agree, none between)
            assert m == ((start, end) in t_span_set)
            if m:
                assert t_spans[a.teacher_index[t]] == (start, end)


ALPHABET = st.sampled_from(list("abcxyz ABC  \n\t0123456789.,;(){}=_+-éü日本語中🙂👍€ß<|>"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(ALPHABET, max_size=40), eos=st.booleans())
def test_alignment_properties(all_toks, text, eos):
    for s_name, t_name in [("sentencepiece", "hf"), ("hf", "tiktoken"), ("tiktoken", "sentencepiece")]:
        s_tok, t_tok = all_toks[s_name], all_toks[t_name]
        s_ids = s_tok.encode(text) + ([s_tok.eos_id] if eos else [])
        t_ids = t_tok.encode(text) + ([t_tok.eos_id] if eos else [])
        a = align_completion(s_tok, s_ids, t_tok, t_ids)
        _check_invariants(a)
        assert all(g.exact for g in a.groups)
        if eos:
            assert a.mask[-1]  # EOS <-> EOS
        # the same tokenisation on both sides aligns everywhere
        assert all(align_completion(s_tok, s_ids, s_tok, s_ids).mask)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(ALPHABET, max_size=40), cuts=st.lists(st.integers(0, 40), max_size=4))
def test_non_canonical_student_tokens(all_toks, text, cuts):
    """A sampled rollout need not be the canonical encoding of its text: alignment uses the sampled ids."""
    pieces, last = [], 0
    for c in sorted({min(c, len(text)) for c in cuts}):
        pieces.append(text[last:c])
        last = c
    pieces.append(text[last:])
    s_tok, t_tok = all_toks["hf"], all_toks["sentencepiece"]
    s_ids = [i for p in pieces for i in s_tok.encode(p)]
    a = align_completion(s_tok, s_ids, t_tok, t_tok.encode(text))
    _check_invariants(a)
    assert b"".join(a.student_bytes) == text.encode("utf-8")
