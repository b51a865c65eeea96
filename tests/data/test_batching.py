"""SFT encoding: shifted labels, completion-only loss mask, padding, over-long rows."""

import pytest
import torch

from opd_megatron.data import DataError, PromptRow
from opd_megatron.data.batching import collate, encode_sft_example
from opd_megatron.tokenization import CharTokenizer

TOK = CharTokenizer()
ROW = PromptRow("sort 21=", "sorting", reference="12")


def test_hand_checked_alignment():
    ex = encode_sft_example(TOK, ROW, max_len=32)
    # position:     0      1-8 (prompt "sort 21=")   9    10    11
    # token:       bos     s o r t ␣ 2 1 =           1    2     eos
    assert ex.tokens == [1] + TOK.encode("sort 21=") + TOK.encode("12") + [2]
    assert ex.labels == ex.tokens[1:] + [TOK.pad_id]
    # Position 8 (the "=") predicts "1", 9 predicts "2", 10 predicts EOS; 11 (EOS) predicts padding.
    assert ex.loss_mask == [0] * 8 + [1, 1, 1, 0]
    targets = [lab for lab, m in zip(ex.labels, ex.loss_mask) if m]
    assert TOK.decode(targets, skip_special=False) == "12<eos>"


def test_without_bos():
    ex = encode_sft_example(TOK, ROW, max_len=32, add_bos=False)
    assert ex.tokens[0] == TOK.encode("s")[0] and len(ex.tokens) == 11
    assert ex.loss_mask == [0] * 7 + [1, 1, 1, 0]


def test_over_long_row():
    with pytest.raises(
        DataError,
        match=r"row \(domain 'sorting', prompt 'sort 21='\) is 12 tokens \(9 prompt \+ 3 completion incl\. EOS\), longer than max_len=11",
    ):
        encode_sft_example(TOK, ROW, max_len=11)
    ex = encode_sft_example(TOK, ROW, max_len=11, truncate=True)
    assert ex.tokens == [1] + TOK.encode("sort 21=12") and ex.loss_mask == [0] * 8 + [1, 1, 0]
    with pytest.raises(DataError, match="truncation would leave no completion token"):
        encode_sft_example(TOK, ROW, max_len=9, truncate=True)
    long_prompt = PromptRow("reverse " + "a" * 60 + "=", "reversal", reference="a" * 60)
    with pytest.raises(DataError, match=r"prompt 'reverse aaaaaaaaaaaaaaaaaaaaaaaaaaaaa\.\.\.'"):
        encode_sft_example(TOK, long_prompt, max_len=64)


def test_needs_reference():
    with pytest.raises(DataError, match="has no reference"):
        encode_sft_example(TOK, PromptRow("hi", "chat"), max_len=8)


def test_collate_right_pads():
    rows = [ROW, PromptRow("reverse abcd=", "reversal", reference="dcba")]
    examples = [encode_sft_example(TOK, r, max_len=32) for r in rows]
    batch = collate(examples, pad_id=TOK.pad_id)
    assert batch["tokens"].shape == batch["labels"].shape == batch["loss_mask"].shape == (2, 19)
    assert batch["tokens"].dtype == torch.long and batch["loss_mask"].dtype == torch.float32
    assert batch["lengths"].tolist() == [12, 19]
    assert batch["tokens"][0, :12].tolist() == examples[0].tokens
    assert (batch["tokens"][0, 12:] == TOK.pad_id).all() and (batch["labels"][0, 12:] == TOK.pad_id).all()
    assert batch["loss_mask"][0, 12:].sum() == 0
    assert batch["loss_mask"].sum(1).tolist() == [3, 5]
    with pytest.raises(ValueError, match="at least one"):
        collate([], pad_id=0)


def test_chat_row_with_rendered_prompt_and_end_of_turn():
    from opd_megatron.data.render import completion_end_ids, render_prompt
    from opd_megatron.data.rows import Message
    from opd_megatron.tokenization.chat_templates import get_template
    from opd_megatron.tokenization.train_local import train_hf_bpe

    tok = train_hf_bpe()
    tpl = get_template("chatml")
    row = PromptRow("Hi", "chat", reference="Hello.", messages=(Message("user", "Hi"),), source="c.jsonl:4")
    prompt = render_prompt(tok, tpl, row)
    end = completion_end_ids(tok, tpl)[0]
    ex = encode_sft_example(tok, row, 64, prompt_ids=prompt, end_id=end)
    assert ex.tokens == prompt + tok.encode("Hello.") + [end]
    assert sum(ex.loss_mask) == len(tok.encode("Hello.")) + 1
    with pytest.raises(DataError, match=r"^c\.jsonl:4 is \d+ tokens"):
        encode_sft_example(tok, row, 8, prompt_ids=prompt, end_id=end)
