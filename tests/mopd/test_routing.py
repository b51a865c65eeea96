"""Unit tests of the MOPD routers (specialty, pass-rate, confidence) and of MOPDConfig validation."""

from __future__ import annotations

import math

import pytest

from opd_megatron.config import ConfigError, MOPDConfig
from opd_megatron.data.jsonl import PromptRow
from opd_megatron.mopd.routing import ConfidenceRouter, PassRateRouter, SpecialtyRouter


def rows(*domains: str) -> list[PromptRow]:
    return [PromptRow(prompt=f"q{i}", domain=d) for i, d in enumerate(domains)]


def test_specialty_sends_each_row_to_the_teacher_listing_its_domain():
    router = SpecialtyRouter({"mathy": ["math", "algebra"], "coder": ["code"]}, default="mathy")
    got = router.route(rows("code", "math", "algebra", "code"))
    assert got == ["coder", "mathy", "mathy", "coder"]


def test_specialty_unknown_domain_goes_to_default_teacher():
    router = SpecialtyRouter({"mathy": ["math"], "coder": ["code"], "chat": []}, default="chat")
    assert router.route(rows("poetry", "math", "", "code")) == ["chat", "mathy", "chat", "coder"]


def test_specialty_exclusive_double_claim_names_both_teachers_and_domain():
    with pytest.raises(ConfigError) as err:
        SpecialtyRouter({"alpha": ["math", "code"], "beta": ["code"]}, default="alpha")
    msg = str(err.value)
    assert "'alpha'" in msg and "'beta'" in msg and "'code'" in msg
    assert "'math'" not in msg


def test_specialty_non_exclusive_first_claimant_wins():
    router = SpecialtyRouter({"alpha": ["code"], "beta": ["code", "math"]}, default="beta", exclusive=False)
    assert router.route(rows("code", "math")) == ["alpha", "beta"]


def test_specialty_unknown_default_teacher_raises():
    with pytest.raises(ConfigError) as err:
        SpecialtyRouter({"alpha": ["code"]}, default="ghost")
    assert err.value.path == "mopd.default_teacher" and "'ghost'" in str(err.value)


def test_pass_rate_picks_best_teacher_per_domain():
    rates = {"math": {"a": 0.2, "b": 0.9, "c": 0.5}, "code": {"a": 0.7, "b": 0.1, "c": 0.3}}
    router = PassRateRouter(rates, order=["a", "b", "c"], default="c")
    assert router.route(rows("math", "code", "math")) == ["b", "a", "b"]


def test_pass_rate_ties_go_to_teacher_listed_first():
    rates = {"math": {"c": 0.5, "b": 0.5, "a": 0.1}}
    assert PassRateRouter(rates, order=["a", "b", "c"], default="a").route(rows("math")) == ["b"]
    assert PassRateRouter(rates, order=["c", "a", "b"], default="a").route(rows("math")) == ["c"]


def test_pass_rate_unknown_domain_goes_to_default():
    router = PassRateRouter({"math": {"a": 0.9, "b": 0.1}}, order=["a", "b"], default="b")
    assert router.route(rows("poetry", "math")) == ["b", "a"]


def test_pass_rate_unknown_teacher_in_table_raises():
    with pytest.raises(ConfigError) as err:
        PassRateRouter({"math": {"a": 0.9, "ghost": 0.1}}, order=["a", "b"], default="a")
    assert err.value.path == "mopd.pass_rates" and "ghost" in str(err.value)


def test_pass_rate_unknown_default_raises():
    with pytest.raises(ConfigError) as err:
        PassRateRouter({"math": {"a": 0.9}}, order=["a", "b"], default="ghost")
    assert err.value.path == "mopd.default_teacher"


def test_confidence_picks_argmax_per_rollout():
    scores = {"a": [-1.0, -3.0, -0.5], "b": [-2.0, -1.0, -0.1], "c": [-5.0, -2.0, -0.2]}
    assert ConfidenceRouter().choose(scores) == ["a", "b", "b"]


def test_confidence_ties_go_to_first_teacher():
    assert ConfidenceRouter().choose({"b": [-1.0, -2.0], "a": [-1.0, -2.0]}) == ["b", "b"]
    assert ConfidenceRouter().choose({"a": [-1.0, -3.0], "b": [-1.0, -2.0]}) == ["a", "b"]


def test_confidence_minus_inf_never_beats_finite_score():
    scores = {"a": [-math.inf, -math.inf, -1e9], "b": [-1e30, -math.inf, -math.inf]}
    assert ConfidenceRouter().choose(scores) == ["b", "a", "a"]


def test_confidence_mismatched_lengths_raise():
    with pytest.raises(ValueError):
        ConfidenceRouter().choose({"a": [0.0, 1.0], "b": [0.0]})


def test_mopd_config_rejects_bad_routing_name():
    with pytest.raises(ConfigError) as err:
        MOPDConfig(routing="roulette")
    assert err.value.path == "routing" and "roulette" in str(err.value)


@pytest.mark.parametrize("rate", [1.5, -0.1])
def test_mopd_config_rejects_out_of_range_pass_rate(rate):
    with pytest.raises(ConfigError) as err:
        MOPDConfig(routing="pass_rate", pass_rates={"math": {"a": 0.5, "b": rate}})
    assert err.value.path == "pass_rates.math.b"


def test_mopd_config_accepts_valid_pass_rates():
    cfg = MOPDConfig(routing="pass_rate", pass_rates={"math": {"a": 0.0, "b": 1.0}})
    assert cfg.pass_rates["math"]["b"] == 1.0
