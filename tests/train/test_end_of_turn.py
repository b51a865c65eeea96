"""Completions end at the chat template's end-of-turn token on every path that makes one, also when it
differs from EOS (a Llama-3 style template: ``<|eot_id|>`` ends a turn, ``<|end_of_text|>`` is EOS)."""

from __future__ import annotations

import pytest

from opd_megatron.config import LossConfig, ModelConfig, ParallelConfig, RunConfig
from opd_megatron.data.jsonl import PromptRow
from opd_megatron.data.render import PromptRenderer
from opd_megatron.tokenization import load_tokenizer
from opd_megatron.tokenization.jinja_template import template_for
from tests.tokenization.hf_dirs import hf_dirs  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def llama3(hf_dirs):  # noqa: F811
    tok = load_tokenizer(hf_dirs["llama3"])
    render = PromptRenderer(tok, template_for(tok, "model"))
    eot = tok.special_token_id("<|eot_id|>")
    assert eot != tok.eos_id and render.end_ids == (eot, tok.eos_id)
    return tok, render, eot


@pytest.fixture(scope="module")
def groups():
    from opd_megatron.distributed import init_distributed

    return init_distributed(ParallelConfig(), 0)


def _model(groups, vocab: int):
    from opd_megatron.models.gpt import build_gpt_model

    return build_gpt_model(ModelConfig(num_layers=1, hidden_size=64, max_sequence_length=64), groups, vocab)


def test_off_policy_references_end_at_end_of_turn(llama3):
    from opd_megatron.rollout.types import SamplingParams
    from opd_megatron.train.rollouts import RolloutSource

    tok, render, eot = llama3
    source = RolloutSource(
        None, tok, render, LossConfig(on_policy_lambda=0.0), SamplingParams(max_new_tokens=4), seed=0
    )
    rows = [
        PromptRow("Name a colour.", "chat", reference="Blue."),
        PromptRow("Hi", "chat", reference="Hello"),
    ]
    batch = source.make(0, rows, 0)
    assert [c[-1] for c in batch.comps] == [eot, eot]
    assert [tok.decode(c[:-1]) for c in batch.comps] == ["Blue.", "Hello"]


def test_student_sampler_stops_on_end_of_turn_and_eos(llama3, groups):
    from opd_megatron.rollout.engines import build_sampler

    tok, render, eot = llama3
    model = _model(groups, tok.vocab_size)
    sampler = build_sampler(RunConfig(), model, groups, tok, end_ids=render.end_ids)
    assert sampler.end_ids == (eot, tok.eos_id) and sampler.eos_id == eot
    assert build_sampler(RunConfig(), model, groups, tok).end_ids == (tok.eos_id,)


def test_teacher_samples_for_off_policy_data_end_at_end_of_turn(llama3, groups):
    from opd_megatron.rollout.types import SamplingParams
    from opd_megatron.train.rollouts import RolloutSource

    tok, render, eot = llama3
    lc = LossConfig(on_policy_lambda=0.0, off_policy_source="teacher")
    source = RolloutSource(None, tok, render, lc, SamplingParams(max_new_tokens=4), seed=0)
    source.use_teacher(_model(groups, tok.vocab_size), groups)
    assert source._teacher_sampler.end_ids == (eot, tok.eos_id)


def test_exact_match_greedy_stops_at_end_of_turn(llama3, groups, monkeypatch):
    """``exact_match`` takes the renderer's end ids: a greedy completion is cut at ``<|eot_id|>``."""
    from opd_megatron.train import evaluate

    tok, render, eot = llama3
    seen = {}

    def fake_greedy(model, prompts, n, ends, pad, g):
        seen["ends"] = ends
        return [[] for _ in prompts]

    monkeypatch.setattr(evaluate, "greedy_generate", fake_greedy)
    monkeypatch.setattr(evaluate, "verify", lambda row, text: False)
    evaluate.exact_match(None, tok, {"chat": [PromptRow("Hi", "chat")]}, groups, 4, 1, prompt_fn=render)
    assert seen["ends"] == (eot, tok.eos_id)
    evaluate.exact_match(None, tok, {"chat": [PromptRow("Hi", "chat")]}, groups, 4, 1)
    assert seen["ends"] == (tok.eos_id,)
