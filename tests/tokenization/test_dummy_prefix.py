"""SentencePiece ``add_dummy_prefix`` (Llama-2 / Mistral style): the dummy space is no part of the text, so
decode round-trips and boundary alignment against a byte-level BPE is as good as without a dummy prefix."""

from __future__ import annotations

import pytest

from opd_megatron.tokenization import load_tokenizer
from opd_megatron.tokenization.alignment import align_bytes, align_completion, alignment_stats
from opd_megatron.tokenization.chat_templates import get_template, reemit_completion
from opd_megatron.tokenization.sentencepiece_tok import SentencePieceTokenizer
from tests.tokenization.hf_dirs import sentencepiece_model

# Plain English not in the tokenizers' training corpus.
ENGLISH = [
    "The quick brown fox",
    "A teacher scores the tokens that the student sampled, one position at a time.",
    "Both models see the same text, so the loss lands where their tokens agree.",
    "It was late in the evening when the train finally left the station.",
    "Please keep the answer short and clear.",
]


@pytest.fixture(scope="module")
def sp_pair():
    return {
        flag: SentencePieceTokenizer(sentencepiece_model(add_dummy_prefix=flag)) for flag in (True, False)
    }


def test_dummy_prefix_is_detected(sp_pair, hf_tok, hf_dirs):
    assert sp_pair[True].dummy_prefix == b" " and sp_pair[False].dummy_prefix == b""
    assert hf_tok.dummy_prefix == b""
    assert load_tokenizer(hf_dirs["mistral"]).dummy_prefix == b" "  # Metaspace, prepend_scheme "first"


@pytest.mark.parametrize("text", [*ENGLISH, " leading space", "  two leading", "x", "", "tail space "])
def test_decode_round_trips(sp_pair, hf_dirs, text):
    from transformers import AutoTokenizer

    for tok in sp_pair.values():
        ids = tok.encode(text)
        assert tok.decode(ids) == text == tok.sp.decode(ids)  # as SentencePiece itself decodes
        assert b"".join(tok.text_bytes(ids)) == text.encode()
    # Hugging Face's Metaspace adds no dummy before a leading space, so " leading" and "leading" encode
    # alike and transformers decodes both without the space; decode agrees with it, and the offsets of an
    # encoding still tile the text exactly.
    mistral = load_tokenizer(hf_dirs["mistral"])
    ids, spans = mistral.encode_with_byte_offsets(text)
    hf = AutoTokenizer.from_pretrained(str(hf_dirs["mistral"]), local_files_only=True)
    assert mistral.decode(ids) == hf.decode(ids)
    if not text.startswith(" "):
        assert mistral.decode(ids) == text
    assert (spans[-1][1] if spans else 0) == len(text.encode())


def test_offsets_exclude_the_dummy_space(sp_pair):
    tok = sp_pair[True]
    text = "The quick brown fox"
    ids, spans = tok.encode_with_byte_offsets(text)
    assert tok.token_bytes(ids[:1])[0].startswith(b" ")  # the piece itself is "▁The"
    assert spans[0][0] == 0 and spans[-1][1] == len(text.encode())
    assert [text.encode()[s:e] for s, e in spans] == tok.text_bytes(ids)


def _alignments(student, teacher, texts):
    tpl = get_template("plain")
    out = []
    for text in texts:
        s_ids = student.encode(text) + [student.eos_id]
        _, _, t_ids = reemit_completion(s_ids, student, tpl, teacher, tpl)
        out.append(align_completion(student, s_ids, teacher, t_ids))
    return out


def _rate(student, teacher, texts) -> float:
    return alignment_stats(_alignments(student, teacher, texts))["align/rate"]


def test_alignment_with_dummy_prefix_at_least_as_high(sp_pair, hf_tok):
    for student_is_bpe in (True, False):
        rates = {}
        for flag, sp in sp_pair.items():
            student, teacher = (hf_tok, sp) if student_is_bpe else (sp, hf_tok)
            rates[flag] = _rate(student, teacher, ENGLISH)
        assert rates[True] >= rates[False] > 0.5, rates


@pytest.mark.parametrize("spaced", [False, True])
def test_both_sides_read_the_same_text(sp_pair, hf_tok, hf_dirs, spaced):
    """Completions with and without a leading space (a BPE student emits both), against SentencePiece and
    its Metaspace conversion, in both directions: the two sides' texts are identical, so no rollout loses
    its alignment to a stray dummy space."""
    texts = [" " + t for t in ENGLISH] if spaced else ENGLISH
    for dummy in (sp_pair[True], load_tokenizer(hf_dirs["mistral"])):
        for student, teacher in ((hf_tok, dummy), (dummy, hf_tok)):
            alignments = _alignments(student, teacher, texts)
            assert all(b"".join(a.teacher_bytes) == a.text for a in alignments)
            assert alignment_stats(alignments)["align/rate"] > 0.5


def test_the_dummy_space_attributed_to_the_text_would_align_nothing(sp_pair, hf_tok):
    """Why the dummy space is removed: counted as text, it shifts every teacher offset by one byte."""
    sp = sp_pair[True]
    text = ENGLISH[0]
    s_ids, t_ids = hf_tok.encode(text), sp.encode(text)
    naive = align_bytes(hf_tok.token_bytes(s_ids), sp.token_bytes(t_ids))
    fixed = align_completion(hf_tok, s_ids, sp, t_ids)
    no_dummy = align_completion(hf_tok, s_ids, sp_pair[False], sp_pair[False].encode(text))
    assert naive.rate == 0.0  # the "0 aligned tokens on 'The quick brown fox'" of the bug report
    assert fixed.rate >= no_dummy.rate > 0


def test_projection_strips_the_teacher_dummy_at_the_first_completion_token(sp_pair, hf_tok):
    from opd_megatron.tokenization.cross import PrefixProjector, plan_cross_tokenizer

    sp = sp_pair[True]
    tpl = get_template("plain")
    text = "The quick brown fox"
    s_ids = hf_tok.encode(text)
    plan = plan_cross_tokenizer(
        [[hf_tok.bos_id or hf_tok.eos_id]], [s_ids], hf_tok, tpl, sp, tpl, [[sp.bos_id]]
    )
    assert plan.prefix_N[0] == b" " and bool(plan.context_N[0])
    first_teacher = plan.teacher_completion_ids[0][0]
    assert sp.token_bytes([first_teacher]) == [b" The"]
    projected = PrefixProjector(hf_tok, sp)(plan.prefix_N[0])
    assert hf_tok.token_bytes([int(projected[first_teacher])]) == [b"The"]  # not the student's " The"
    # Without a dummy prefix nothing changes.
    plain = plan_cross_tokenizer([[sp.bos_id]], [s_ids], hf_tok, tpl, sp_pair[False], tpl, [[sp.bos_id]])
    assert plain.prefix_N[0] == b""
