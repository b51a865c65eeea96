"""DataConfig fields for chat data: column mapping, extra columns, default domain."""

from __future__ import annotations

import pytest

from opd_megatron.config import ConfigError, load_config


def test_chat_data_fields():
    cfg = load_config(
        overrides=[
            "data.domains=[]",
            "data.train_path=rows.parquet",
            "data.fields.messages=conversations",
            "data.extra_fields=ignore",
            "data.default_domain=chat",
        ]
    )
    assert cfg.data.fields == {"messages": "conversations"}
    assert (cfg.data.extra_fields, cfg.data.default_domain) == ("ignore", "chat")


@pytest.mark.parametrize(
    "override, path, message",
    [
        (
            "data.fields.prompts=question",
            "data.fields.prompts",
            "not a row field; row fields: prompt, domain",
        ),
        ("data.extra_fields=drop", "data.extra_fields", "allowed: 'error', 'ignore'"),
        ("data.default_domain=' '", "data.default_domain", "must be a non-empty string"),
    ],
)
def test_bad_chat_data_fields(override, path, message):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert e.value.path == path and message in e.value.message


def test_config_does_not_import_the_data_package():
    import subprocess
    import sys

    code = "import sys, opd_megatron.config as c; c.DataConfig(); print('opd_megatron.data' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
