"""The config tree: YAML + overrides, and a specific error for each kind of mistake."""

from __future__ import annotations

import pytest

from opd_megatron.config import (
    ConfigError,
    RunConfig,
    TeacherConfig,
    apply_overrides,
    from_dict,
    load_config,
    to_dict,
)


def test_defaults_round_trip_through_dict():
    cfg = RunConfig()
    assert from_dict(RunConfig, to_dict(cfg)) == cfg


def test_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("name: x\ntrain:\n  lr: 0.01\n  steps: 5\nmodel:\n  hidden_size: 64\n")
    cfg = load_config(
        path, ["train.lr=3e-4", "data.domains=[reversal]", "teachers=[{name: a, placement: self}]"]
    )
    assert cfg.name == "x" and cfg.train.steps == 5 and cfg.model.hidden_size == 64
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.data.domains == ["reversal"]
    assert cfg.teachers == [TeacherConfig(name="a", placement="self")]


@pytest.mark.parametrize(
    "overrides, path, fragment",
    [
        (["train.steps=abc"], "train.steps", "expected an integer, got str 'abc'"),
        (["train.lrr=1"], "train.lrr", "did you mean 'lr'?"),
        (["parallel.tensor_model_parallel_size=3"], "parallel.tensor_model_parallel_size", "does not divide"),
        (
            ["parallel.pipeline_model_parallel_size=3"],
            "parallel.pipeline_model_parallel_size",
            "num_layers=2",
        ),
        (["model.fp8=e5m2"], "model.fp8", "allowed: 'e4m3', 'hybrid'"),
        (["loss.divergence=kl"], "loss.divergence", "allowed: 'forward_kl'"),
        (["data.domains=[addition, poetry]"], "data.domains[1]", "unknown domain 'poetry'"),
        (["model.hidden_size=130"], "model.hidden_size", "not divisible by num_attention_heads=4"),
        (["train.use_cuda=true"], "train.use_cuda", "unknown key"),
        (["teachers=[{name: t, placement: remote}]"], "teachers[0].url", "needs a url"),
        (["teachers=[{name: t, placement: self}, {name: t, placement: self}]"], "teachers", "repeated: t"),
        (["train.resume=maybe"], "train.resume", "expected true/false"),
    ],
)
def test_each_mistake_names_its_field(overrides, path, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=overrides)
    assert err.value.path == path
    assert fragment in str(err.value)


def test_yaml_with_wrong_type_for_a_section(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: 5\n")
    with pytest.raises(ConfigError, match=r"train: expected a mapping for TrainConfig, got int"):
        load_config(path)


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match="section.field=value"):
        apply_overrides({}, ["train.lr"])


@pytest.mark.parametrize("path", ["examples/specialise/expert.yaml", "examples/opd/distill.yaml"])
def test_example_configs_load(path):
    from pathlib import Path

    cfg = load_config(Path(__file__).parent.parent / path)
    assert cfg.name and cfg.train.steps > 0
