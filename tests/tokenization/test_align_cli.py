"""The ``opd-megatron align`` inspector and ``tools/inspect_alignment.py``."""

from __future__ import annotations

import json

import pytest

from opd_megatron.cli import main
from opd_megatron.tokenization.cli import load_tokenizer_spec


def test_align_report(capsys):
    assert main(["align", "--text", "Hi 12345 日本🙂", "--eos", "--teacher", "demo:tiktoken"]) == 0
    out = capsys.readouterr().out
    assert "student: SentencePieceTokenizer" in out and "teacher: TiktokenTokenizer" in out
    assert "| 2:1 | boundaries disagree inside" in out  # " 1" vs " " "1"
    assert "[</s>] | t10:11 [<|endoftext|>] | 19-19 | 1:1 | aligned" in out
    assert "'\\xa5本'" in out  # a teacher token starting inside a character
    assert "alignment rate: 0.23 over 13 student tokens" in out and "digits 0.00 (n=5)" in out


def test_align_json_and_tool(tmp_path, capsys):
    from tools.inspect_alignment import main as tool_main

    text_file = tmp_path / "t.txt"
    text_file.write_text("def f(x):\n    return 42\n", encoding="utf-8")
    assert main(["align", "--text-file", str(text_file), "--json", "--student", "demo:hf"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert all(out["mask"]) and out["stats"]["align/rate"] == 1.0  # the same tokenizer on both sides
    assert out["stats"]["align/rate_nonascii"] is None
    assert tool_main(["--text", "x", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mask"] == [True]


def test_tokenizer_specs(tmp_path, capsys):
    tok = load_tokenizer_spec("demo:hf")
    tok.save(tmp_path / "tok")
    assert load_tokenizer_spec(str(tmp_path / "tok")).encode("abc") == tok.encode("abc")
    assert load_tokenizer_spec(f"hf:{tmp_path / 'tok' / 'tokenizer.json'}").encode("abc") == tok.encode("abc")
    assert main(["align", "--text", "x", "--student", "demo:nope"]) != 0
    assert "unknown demo tokenizer 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["align"])  # a text is required
