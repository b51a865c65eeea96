"""JSONL prompt files: round trip and one specific error per kind of bad row."""

import json

import pytest

from opd_megatron.data.jsonl import DataError, PromptRow, read_jsonl, write_jsonl

ROWS = [
    PromptRow("add 001+002=", "addition", reference="0003", privileged="answer: 0003"),
    PromptRow("what is\nup?", "chat"),
    PromptRow("unicode é ✓", "misc", reference=""),
]


def test_round_trip(tmp_path):
    path = tmp_path / "sub" / "rows.jsonl"
    write_jsonl(path, ROWS)
    assert read_jsonl(path) == ROWS
    # None fields are omitted, so hand-written and generated files look alike.
    assert json.loads(path.read_text(encoding="utf-8").splitlines()[1]) == {
        "prompt": "what is\nup?",
        "domain": "chat",
    }
    assert not [p for p in path.parent.iterdir() if p.name != "rows.jsonl"]  # no temporary file left


def test_blank_lines_and_null_fields(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(
        '\n{"prompt": "p", "domain": "d", "reference": null}\n   \n\n{"prompt": "q", "domain": "d"}\n'
    )
    assert read_jsonl(path) == [PromptRow("p", "d"), PromptRow("q", "d")]


GOOD = '{"prompt": "ok", "domain": "d"}'


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"prompt": "x", "domain": "d"', "invalid JSON: Expecting ',' delimiter at column 30"),
        ('["prompt", "x"]', "expected a JSON object, got list"),
        ('{"domain": "d"}', "missing required field 'prompt'"),
        ('{"prompt": "x"}', "missing required field 'domain'"),
        ('{"prompt": 5, "domain": "d"}', "field 'prompt' must be a string, got int 5"),
        (
            '{"prompt": "x", "domain": "d", "reference": 12}',
            "field 'reference' must be a string or null, got int 12",
        ),
        (
            '{"prompt": "x", "domain": "d", "refrence": "y"}',
            "unknown field 'refrence'; did you mean 'reference'?",
        ),
        (
            '{"prompt": "x", "domain": "d", "zzz": 1}',
            "unknown field 'zzz'; known fields: prompt, domain, reference",
        ),
        ('{"prompt": "  ", "domain": "d"}', "field 'prompt' is empty"),
        ('{"prompt": "x", "domain": ""}', "field 'domain' is empty"),
    ],
)
def test_bad_row_names_file_line_and_problem(tmp_path, bad_line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{GOOD}\n\n{bad_line}\n{GOOD}\n")
    with pytest.raises(DataError) as e:
        read_jsonl(path)
    assert str(e.value).startswith(f"{path}:3: ")
    assert message in str(e.value)


def test_bad_utf8_names_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(GOOD.encode() + b'\n{"prompt": "\xff", "domain": "d"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid UTF-8"):
        read_jsonl(path)


def test_long_bad_value_is_shortened(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": ["x" * 500], "domain": "d"}) + "\n")
    with pytest.raises(DataError, match=r"got list \['xxx") as e:
        read_jsonl(path)
    assert len(str(e.value)) < 200
