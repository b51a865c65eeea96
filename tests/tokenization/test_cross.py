"""Cross-tokenizer batch plan: re-emission + alignment + row mapping, then the ULD/hybrid loss on it."""

from __future__ import annotations

import torch

from opd_megatron.losses.uld import cross_tokenizer_loss, shared_vocab
from opd_megatron.tokenization.chat_templates import Turn, encode_segments, get_template
from opd_megatron.tokenization.cross import plan_cross_tokenizer


def test_plan_maps_student_tokens_to_teacher_rows(sp_tok, hf_tok):
    s_tpl, t_tpl = get_template("chatml"), get_template("llama3")
    answers = ["The answer is 12345.", "", "日本 🙂 ok"]
    prompts = [encode_segments(sp_tok, s_tpl.render([Turn("user", f"q{k}")], True)) for k in range(3)]
    im_end = sp_tok.special_token_id("<|im_end|>")
    completions = [[*sp_tok.encode(a), im_end] for a in answers[:2]] + [
        sp_tok.encode(answers[2])
    ]  # last unfinished
    plan = plan_cross_tokenizer(prompts, completions, sp_tok, s_tpl, hf_tok, t_tpl)
    n = sum(map(len, completions))
    assert plan.aligned_N.shape == plan.teacher_index_N.shape == (n,)
    flat_teacher = [i for c in plan.teacher_completion_ids for i in c]
    flat_student = [i for c in completions for i in c]
    for t in torch.nonzero(plan.aligned_N).flatten().tolist():  # aligned: the same text, or end <-> end
        u = plan.teacher_index_N[t].item()
        assert sp_tok.token_bytes([flat_student[t]]) == hf_tok.token_bytes([flat_teacher[u]])
    assert plan.teacher_completion_ids[1] == [hf_tok.special_token_id("<|eot_id|>")]  # empty but finished
    assert plan.aligned_N[len(completions[0])].item()  # its end token aligns
    assert plan.teacher_index_N.max().item() == len(flat_teacher) - 1
    assert plan.stats()["align/tokens"] == n

    # the loss side: gather teacher rows, hybrid KL where aligned, ULD elsewhere; grads only to the student
    s_ids, t_ids = shared_vocab(sp_tok, hf_tok)
    student_NV = torch.randn(n, sp_tok.vocab_size, requires_grad=True)
    teacher_MW = torch.randn(len(flat_teacher), hf_tok.vocab_size)
    has = plan.teacher_index_N >= 0
    loss_N = cross_tokenizer_loss(
        student_NV[has], teacher_MW[plan.teacher_index_N[has]], plan.aligned_N[has], s_ids, t_ids
    )
    loss_N.mean().backward()
    assert torch.isfinite(student_NV.grad).all() and student_NV.grad.abs().sum() > 0


def test_canonical_ids_prefer_the_piece_the_tokenizer_emits_over_its_byte_fallback_twin(sp_tok):
    from opd_megatron.tokenization.cross import canonical_token_ids

    canon = canonical_token_ids(sp_tok)
    for text in ("1", "a", "e", " "):
        (emitted,) = sp_tok.encode(text)
        twins = [i for i in range(sp_tok.vocab_size) if sp_tok.token_bytes([i]) == [text.encode()]]
        assert len(twins) >= 2, (text, twins)  # the learned piece and the <0x..> byte piece
        assert canon[text.encode()] == emitted


def test_prefix_projection_maps_teacher_tokens_to_the_students_next_token(sp_tok, tk_tok):
    from opd_megatron.tokenization.alignment import align_completion
    from opd_megatron.tokenization.cross import PrefixProjector, covering_teacher_tokens

    proj = PrefixProjector(sp_tok, tk_tok)
    spm_id = lambda s: sp_tok.encode(s)[0]  # noqa: E731 (digits are single pieces)
    # tiktoken groups digits (up to three); the student splits them one by one
    multi = [
        (i, b) for i in range(tk_tok.vocab_size)
        for b in tk_tok.token_bytes([i]) if len(b) >= 2 and b.isdigit()
    ]  # fmt: skip
    assert multi, "the trained tiktoken vocabulary has no multi-digit token"
    w, b = multi[0]
    assert proj(b"")[w] == spm_id(b[:1].decode()) and proj(b[:1])[w] == spm_id(b[1:2].decode())
    assert proj(b)[w] == -1 and proj(b"x")[w] == -1  # the token is used up / does not fit the prefix
    # the student's digits inside that one teacher token: one teacher row, growing prefixes
    text = b.decode()
    assert tk_tok.encode(text) == [w]
    a = align_completion(sp_tok, sp_tok.encode(text), tk_tok, [w])
    rows, starts, prefixes = covering_teacher_tokens(a)
    assert rows == [0] * len(b) and starts == [True] + [False] * (len(b) - 1)
    assert prefixes == [b[:k] for k in range(len(b))]
