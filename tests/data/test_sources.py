"""Prompt rows from JSONL, Parquet and saved ``datasets`` directories: the same rows from each, every bad
row reported with its location before anything else happens, one-line errors for bad paths."""

from __future__ import annotations

import json

import pytest

from opd_megatron.config import ROW_FIELDS, DataConfig
from opd_megatron.data import DOMAINS, build_datasets
from opd_megatron.data.render import render_prompt
from opd_megatron.data.rows import FIELDS, DataError, Message, PromptRow
from opd_megatron.data.sources import read_rows
from opd_megatron.tokenization import load_tokenizer
from opd_megatron.tokenization.jinja_template import template_for

RECORDS = [
    {"messages": [{"role": "user", "content": "What is 2 + 2?"}], "domain": "math", "reference": "4"},
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Red."},
        ],
        "domain": "chat",
        "privileged": "any colour",
    },
    {
        "messages": [
            {"role": "user", "content": "Call the tool."},
            {"role": "assistant", "content": "Calling."},
            {"role": "tool", "content": '{"ok": true}'},
        ],
        "domain": "tools",
    },
    {"prompt": "add 001+002=", "domain": "addition", "reference": "0003"},
]


def _write_all(tmp_path, records):
    """The same records as JSONL, Parquet and a datasets directory."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    keys = list(dict.fromkeys(k for r in records for k in r))  # from_pylist takes the first row's keys
    table = pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in records])
    parquet = tmp_path / "rows.parquet"
    pq.write_table(table, parquet)
    ds_dir = tmp_path / "rows_ds"
    datasets.Dataset(table).save_to_disk(str(ds_dir))
    return jsonl, parquet, ds_dir


def test_field_names_agree_with_the_config():
    assert FIELDS == ROW_FIELDS
    assert tuple(DOMAINS) == tuple(DataConfig().domains)


def test_three_formats_give_the_same_rows_and_prompt_ids(tmp_path, hf_dirs):
    paths = _write_all(tmp_path, RECORDS)
    per_format = [read_rows(p) for p in paths]
    assert per_format[0] == per_format[1] == per_format[2]
    rows = per_format[0]
    assert rows[0] == PromptRow("What is 2 + 2?", "math", "4", None, (Message("user", "What is 2 + 2?"),))
    # A trailing assistant message is the answer: it becomes the reference, the turns before it the prompt.
    assert rows[1].reference == "Red." and [m.role for m in rows[1].messages] == ["system", "user"]
    assert rows[1].privileged == "any colour" and rows[1].prompt == "Name a colour."
    assert rows[2].messages[-1] == Message("tool", '{"ok": true}') and rows[2].reference is None
    assert rows[3].messages is None and rows[3].prompt == "add 001+002="
    assert [r.source for r in per_format[0]] == [f"{paths[0]}:{i}" for i in (1, 2, 3, 4)]
    assert [r.source for r in per_format[1]] == [f"{paths[1]}: row {i}" for i in range(4)]

    tok = load_tokenizer(hf_dirs["chatml"])
    tpl = template_for(tok, "model")
    ids = [[render_prompt(tok, tpl, r) for r in rows] for rows in per_format]
    assert ids[0] == ids[1] == ids[2]
    assert len({tuple(i) for i in ids[0]}) == 4


def test_build_datasets_reads_every_format_and_checks_leaks(tmp_path):
    jsonl, parquet, ds_dir = _write_all(tmp_path, RECORDS)
    cfg = DataConfig(domains=[], train_path=str(parquet), eval_path=str(ds_dir))
    with pytest.raises(
        DataError, match=r"4 eval prompt\(s\) also occur in the training rows \(first: .*rows_ds: row 0"
    ):
        build_datasets(cfg)
    train, evals = build_datasets(DataConfig(domains=[], train_path=str(jsonl)))
    assert sorted(r.domain for r in train) == ["addition", "chat", "math", "tools"] and evals == {}


def test_field_mapping_extra_columns_and_default_domain(tmp_path):
    records = [
        {"conversation": [{"role": "user", "content": "hi"}], "id": 7, "answer": "hello"},
        {"conversation": [{"role": "user", "content": "bye"}], "id": 8, "answer": None},
    ]
    jsonl, parquet, ds_dir = _write_all(tmp_path, records)
    fields = {"messages": "conversation", "reference": "answer"}
    for path in (jsonl, parquet, ds_dir):
        with pytest.raises(DataError, match="unknown field 'id'; known fields: .*data.extra_fields=ignore"):
            read_rows(path, fields)
        rows = read_rows(path, fields, extra_fields="ignore", default_domain="chat")
        assert [(r.prompt, r.domain, r.reference) for r in rows] == [
            ("hi", "chat", "hello"),
            ("bye", "chat", None),
        ]
    with pytest.raises(
        DataError, match=r"data.fields.prompt names column 'question', which it does not have"
    ):
        read_rows(parquet, {"prompt": "question"})


BAD_ROWS = [
    (
        {"messages": [{"role": "wizard", "content": "x"}], "domain": "d"},
        "messages[0] has unknown role 'wizard'",
    ),
    ({"messages": [], "domain": "d"}, "field 'messages' is an empty conversation"),
    (
        {"messages": [{"role": "user", "content": 5}], "domain": "d"},
        "messages[0] (user) content must be a string, got int 5",
    ),
    ({"messages": [{"role": "user"}], "domain": "d"}, "messages[0] (user) has no 'content'"),
    ({"messages": [{"content": "x"}], "domain": "d"}, "messages[0] has no 'role'"),
    ({"messages": "hello", "domain": "d"}, "field 'messages' must be a list of messages, got str"),
    ({"messages": [{"role": "system", "content": "x"}], "domain": "d"}, "no user message before the answer"),
    (
        {"messages": [{"role": "user", "content": "x"}], "prompt": "y", "domain": "d"},
        "either 'prompt' or 'messages'",
    ),
    ({"domain": "d"}, "missing required field 'prompt' (or 'messages')"),
    ({"messages": [{"role": "user", "content": "x"}]}, "missing required field 'domain'"),
    (
        {
            "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
            "domain": "d",
            "reference": "z",
        },
        "ends with an assistant message and the row also has a 'reference'",
    ),
    (
        {"messages": [{"role": "user", "content": "x", "tool_calls": "[]"}], "domain": "d"},
        "unsupported key 'tool_calls'",
    ),
]


@pytest.mark.parametrize("record, message", BAD_ROWS)
def test_bad_jsonl_row_names_file_and_line(tmp_path, record, message):
    good = json.dumps(RECORDS[0])
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n\n{json.dumps(record)}\n{good}\n")
    with pytest.raises(DataError) as e:
        read_rows(path)
    assert str(e.value) == f"{path}:3: {str(e.value).split(': ', 1)[1]}"
    assert message in str(e.value) and "\n" not in str(e.value)


def test_every_bad_row_is_reported_at_once(tmp_path):
    good = json.dumps(RECORDS[0])
    lines = [
        good,
        '{"prompt": "x", "domain": "d"',
        good,
        json.dumps(BAD_ROWS[0][0]),
        json.dumps(BAD_ROWS[2][0]),
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        read_rows(path)
    assert e.value.errors == [
        f"{path}:2: invalid JSON: Expecting ',' delimiter at column 30",
        f"{path}:4: messages[0] has unknown role 'wizard'; roles: system, user, assistant, tool",
        f"{path}:5: messages[0] (user) content must be a string, got int 5",
    ]
    assert str(e.value).splitlines()[-1] == f"3 bad rows in {path}"


def test_bad_rows_in_tables_name_the_row(tmp_path):
    records = [RECORDS[0], {"messages": [{"role": "robot", "content": "x"}], "domain": "d"}]
    _, parquet, ds_dir = _write_all(tmp_path, records)
    for path in (parquet, ds_dir):
        with pytest.raises(DataError, match=rf"^{path}: row 1: messages\[0\] has unknown role 'robot'"):
            read_rows(path)


def test_bad_paths_are_one_line_errors(tmp_path):
    with pytest.raises(
        DataError, match=rf"^data.train_path: no such file or directory: {tmp_path / 'nope.jsonl'}$"
    ):
        read_rows(tmp_path / "nope.jsonl")
    (tmp_path / "somedir").mkdir()
    with pytest.raises(
        DataError, match=r"^data.eval_path: .*somedir is a directory, not a JSONL or Parquet file"
    ):
        read_rows(tmp_path / "somedir", field_name="data.eval_path")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"junk.parquet: not a readable Parquet file"):
        read_rows(tmp_path / "junk.parquet")
    import datasets

    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list([RECORDS[3]]), "test": datasets.Dataset.from_list([RECORDS[3]])}
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(
        DataError, match=r"dd: a dataset with several splits \(test, train\); point the path at one split"
    ):
        read_rows(tmp_path / "dd")
    assert read_rows(tmp_path / "dd" / "train")[0].prompt == "add 001+002="


def test_written_rows_read_back_the_same(tmp_path):
    from opd_megatron.data.jsonl import write_jsonl

    jsonl, _, _ = _write_all(tmp_path, RECORDS)
    rows = read_rows(jsonl)
    write_jsonl(tmp_path / "again.jsonl", rows)
    assert read_rows(tmp_path / "again.jsonl") == rows
