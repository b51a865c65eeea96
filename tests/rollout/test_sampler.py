"""The KV-cache sampler on real Megatron GPTModels: TP=1 against the recompute greedy decoder and full
recomputes, TP=2 and PP=2 against TP=1 from the same checkpoint.

Starting processes (importing Megatron-core) dominates on CPU, so one 2-process gloo job runs every
layout in turn: TP=1 (each rank a data-parallel replica; rank 0 runs the single-process checks and
saves the checkpoints), then TP=2, then PP=2, then TP=1 again to recompute the log-softmax of the tokens
the other layouts sampled. The tests only compare what the job recorded.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.multirank import run_ranks

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"
VOCAB = 4 + len(CHARS)  # 40, padded to 48: the last TP=2 shard holds padding rows that must never win
PAD, EOS = 0, 2
N_NEW = 10
MAX_LEN = 48
STUDENT = {"num_layers": 2, "hidden_size": 64}
TEACHER = {"num_layers": 2, "hidden_size": 32}


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in (3, 7, 1, 5, 9)]


def _tokenizer():
    from opd_megatron.tokenization.char import CharTokenizer

    return CharTokenizer(CHARS)


def _build(groups, shape: dict, seed: int, vocab: int = VOCAB):
    from opd_megatron.config import ModelConfig
    from opd_megatron.models.gpt import build_gpt_model

    # A larger init than the default makes next-token distributions peaked enough that argmax and
    # nucleus boundaries are far from float noise.
    cfg = ModelConfig(
        **shape, num_attention_heads=4, num_query_groups=2, max_sequence_length=MAX_LEN, init_method_std=0.1
    )
    return build_gpt_model(cfg, groups, vocab, seed=seed)


def _loaded(groups, root: str):
    from opd_megatron.models.checkpoint import load_model_weights

    student, teacher = _build(groups, STUDENT, seed=11), _build(groups, TEACHER, seed=12)
    load_model_weights(Path(root) / "student", student)
    load_model_weights(Path(root) / "teacher", teacher)
    return student, teacher


def _params(kind: str):
    from opd_megatron.rollout.types import SamplingParams

    return {
        "greedy": SamplingParams(max_new_tokens=N_NEW, temperature=0.0),
        "sampled": SamplingParams(max_new_tokens=N_NEW, temperature=1.0, seed=3),
        "unseeded": SamplingParams(max_new_tokens=N_NEW, temperature=1.0),
        "top_k": SamplingParams(max_new_tokens=N_NEW, temperature=0.8, top_k=3, seed=4),
        "top_p": SamplingParams(max_new_tokens=N_NEW, temperature=0.8, top_p=0.6, seed=5),
        "mixed": SamplingParams(max_new_tokens=N_NEW, temperature=0.9, seed=6),
        "temp": SamplingParams(max_new_tokens=N_NEW, temperature=0.7, seed=7),
        "top_k1": SamplingParams(max_new_tokens=N_NEW, temperature=1.0, top_k=1, seed=8),
        "top_p_tiny": SamplingParams(max_new_tokens=N_NEW, temperature=1.0, top_p=1e-6, seed=9),
    }["mixed" if kind in MIX_ALPHA else kind]


MIX_ALPHA = {"mixed": 0.5, "mixed_a0": 0.0, "mixed_a1": 1.0}


def _suite(student, teacher, groups) -> dict:
    """The rollouts every layout produces."""
    from opd_megatron.rollout.sampler import MegatronSampler

    sampler = MegatronSampler(student, groups, eos_id=EOS, pad_id=PAD, tokenizer=_tokenizer())
    prompts = _prompts()
    kinds = ("greedy", "sampled", "unseeded", "top_k", "top_p")
    out = {k: sampler.generate(prompts, _params(k)) for k in kinds}
    out["mixed"] = sampler.generate(prompts, _params("mixed"), mix_with=(teacher, MIX_ALPHA["mixed"]))
    # The same requests through Megatron-core's own forward (no lean decode path).
    megatron = MegatronSampler(
        student, groups, eos_id=EOS, pad_id=PAD, tokenizer=_tokenizer(), lean_decode=False
    )
    assert megatron._stage.lean is None and sampler._stage.lean is not None
    for k in ("greedy", "sampled", "top_p"):
        out[f"megatron_{k}"] = megatron.generate(prompts, _params(k))
    out["megatron_mixed"] = megatron.generate(
        prompts, _params("mixed"), mix_with=(teacher, MIX_ALPHA["mixed"])
    )
    return out


def _catch(fn) -> str:
    try:
        fn()
    except (ValueError, NotImplementedError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def _tp1_checks(student, teacher, groups) -> dict:
    from opd_megatron.rollout.greedy import greedy_generate
    from opd_megatron.rollout.sampler import MegatronSampler
    from opd_megatron.rollout.types import SamplingParams

    tok = _tokenizer()
    prompts = _prompts()
    sampler = MegatronSampler(student, groups, eos_id=EOS, pad_id=PAD, tokenizer=tok)
    out = _suite(student, teacher, groups)
    out["recompute_greedy"] = greedy_generate(student, prompts, N_NEW, EOS, PAD, groups)
    for k in ("temp", "top_k1", "top_p_tiny"):
        out[k] = sampler.generate(prompts, _params(k))
    out["sampled_again"] = sampler.generate(prompts, _params("sampled"))
    for k in ("mixed_a0", "mixed_a1"):
        out[k] = sampler.generate(prompts, _params("mixed"), mix_with=(teacher, MIX_ALPHA[k]))
    chunked = MegatronSampler(student, groups, eos_id=EOS, pad_id=PAD, max_batch_size=2)
    out["chunked"] = chunked.generate(prompts, _params("greedy"))

    # EOS: a token the first row generates first becomes the EOS id.
    ref = out["greedy"].completion_ids
    eos = next(c[0] for c in ref if c[0] != EOS)
    out["eos_id"] = eos
    out["eos"] = MegatronSampler(student, groups, eos_id=eos, pad_id=PAD).generate(prompts, _params("greedy"))
    # The same id as a second end id (a template's end-of-turn besides EOS), with an EOS greedy never
    # produces here: the rows end exactly as above.
    unused = next(i for i in range(4, VOCAB) if all(i not in c for c in out["eos"].completion_ids))
    out["stop_ids"] = MegatronSampler(student, groups, eos_id=unused, stop_ids=(eos,), pad_id=PAD).generate(
        prompts, _params("greedy")
    )
    out["recompute_stop_ids"] = greedy_generate(student, prompts, N_NEW, (unused, eos), PAD, groups)

    # Stop string: two different consecutive characters from some greedy completion.
    stop = next(
        tok.decode(c[t - 1 : t + 1])
        for c in ref
        for t in range(1, len(c))
        if c[t] != c[t - 1] and len(tok.decode(c[t - 1 : t + 1])) == 2
    )
    out["stop_string"] = stop
    out["stop"] = sampler.generate(
        prompts, SamplingParams(max_new_tokens=N_NEW, temperature=0.0, stop=["#", stop])
    )

    other_vocab = _build(groups, {"num_layers": 1, "hidden_size": 32}, seed=3, vocab=56)
    greedy = _params("greedy")
    out["errors"] = {
        "empty_list": _catch(lambda: sampler.generate([], greedy)),
        "empty_prompt": _catch(lambda: sampler.generate([[5], []], greedy)),
        "too_long": _catch(lambda: sampler.generate([[5] * (MAX_LEN - N_NEW + 1)], greedy)),
        "bad_token": _catch(lambda: sampler.generate([[5, VOCAB]], greedy)),
        "stop_without_tokenizer": _catch(
            lambda: chunked.generate(prompts, SamplingParams(max_new_tokens=2, temperature=0, stop=["a"]))
        ),
        "mixed_top_k": _catch(lambda: sampler.generate(prompts, _params("top_k"), mix_with=(teacher, 0.5))),
        "teacher_vocab": _catch(
            lambda: sampler.generate(prompts, _params("mixed"), mix_with=(other_vocab, 0.5))
        ),
    }
    return out


def _rescore(student, teacher, rollout, temperature: float) -> dict:
    """Full-recompute ``log_softmax(logits / T)`` ``[C, VOCAB]`` at each completion position (TP=1)."""

    def score(model):
        rows = []
        for p, c in zip(rollout.prompt_ids, rollout.completion_ids):
            seq = torch.tensor([p + c])
            with torch.no_grad():
                logits = model(seq, torch.arange(seq.shape[1])[None], None)[0, :, :VOCAB].double()
            rows.append(torch.log_softmax(logits[len(p) - 1 : len(p) + len(c) - 1] / temperature, -1))
        return rows

    student.eval()
    teacher.eval()
    return {"student": score(student), "teacher": score(teacher)}


def _job(rank: int, root: str) -> dict:
    import torch.distributed as dist

    from opd_megatron.config import ParallelConfig
    from opd_megatron.distributed import init_distributed
    from opd_megatron.models.checkpoint import save_checkpoint

    out: dict = {}
    groups = init_distributed(ParallelConfig())  # TP=1: two data-parallel replicas
    student, teacher = _build(groups, STUDENT, seed=0), _build(groups, TEACHER, seed=1)
    save_checkpoint(Path(root) / "student", 1, student, groups)
    save_checkpoint(Path(root) / "teacher", 1, teacher, groups)
    if rank == 0:
        out["tp1"] = _tp1_checks(student, teacher, groups)
    dist.barrier()

    for name, layout in (
        ("tp2", {"tensor_model_parallel_size": 2}),
        ("pp2", {"pipeline_model_parallel_size": 2}),
    ):
        groups = init_distributed(ParallelConfig(**layout))
        out[name] = _suite(*_loaded(groups, root), groups)

    groups = init_distributed(ParallelConfig())
    student, teacher = _loaded(groups, root)  # loading is collective: every rank takes part
    if rank == 0:
        out["scores"] = {
            (layout, kind): _rescore(student, teacher, ro, _params(kind).temperature or 1.0)
            for layout in ("tp1", "tp2", "pp2")
            for kind, ro in out[layout].items()
            if kind
            in ("greedy", "sampled", "unseeded", "top_k", "top_p", "mixed", "temp", "mixed_a0", "mixed_a1")
        }
    dist.barrier()
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampler")
    ranks = run_ranks(_job, 2, timeout=400, args=(str(root),))
    return {**ranks[0], "rank1": ranks[1]}


# ---------------------------------------------------------------------------------------------- helpers
def _expected(kind: str, scores, tok: int, t: int, row: int) -> tuple[float, float]:
    """(behaviour log-prob, importance weight) the sampler should report for ``tok`` at step ``t``."""
    s_lp = scores["student"][row][t]
    if kind in MIX_ALPHA:
        alpha = MIX_ALPHA[kind]
        t_lp = scores["teacher"][row][t]
        log_a = math.log(alpha) if alpha > 0 else -math.inf
        log_1ma = math.log1p(-alpha) if alpha < 1 else -math.inf
        mix = float(torch.logaddexp(t_lp[tok] + log_a, s_lp[tok] + log_1ma))
        return mix, math.exp(float(s_lp[tok]) - mix)
    params = _params(kind)
    if params.top_k:
        kept = s_lp.topk(params.top_k).indices
    elif params.top_p < 1:
        order = s_lp.argsort(descending=True)
        probs = s_lp[order].exp()
        kept = order[(probs.cumsum(0) - probs) < params.top_p]
    else:
        kept = torch.arange(VOCAB)
    assert tok in kept.tolist(), f"{kind}: token {tok} at step {t} is outside the filtered set"
    return float(s_lp[tok] - torch.logsumexp(s_lp[kept], 0)), 1.0


def _check_logprobs(results, layout: str, kind: str, atol: float = 1e-5):
    ro = results[layout][kind]
    scores = results["scores"][(layout, kind)]
    for i, (c, lps) in enumerate(zip(ro.completion_ids, ro.logprobs)):
        assert all(0 <= y < VOCAB for y in c)
        for t, (y, lp) in enumerate(zip(c, lps)):
            exp_lp, exp_w = _expected(kind, scores, y, t, i)
            assert lp == pytest.approx(exp_lp, abs=atol), (layout, kind, i, t)
            if ro.importance_weights is not None:
                assert ro.importance_weights[i][t] == pytest.approx(exp_w, rel=1e-4), (layout, kind, i, t)


def _strip_eos(c: list[int]) -> list[int]:
    return c[:-1] if c and c[-1] == EOS else c


# ---------------------------------------------------------------------------------------------- TP=1
def test_kv_cache_greedy_equals_recompute_greedy_decoder(results):
    tp1 = results["tp1"]
    assert [_strip_eos(c) for c in tp1["greedy"].completion_ids] == tp1["recompute_greedy"]
    for c, r in zip(tp1["greedy"].completion_ids, tp1["greedy"].finish_reason):
        assert r == ("eos" if c[-1] == EOS else "length") and len(c) <= N_NEW


def test_greedy_logprobs_are_unscaled_model_logprobs(results):
    _check_logprobs(results, "tp1", "greedy")


def test_batches_of_two_equal_one_batch(results):
    assert results["tp1"]["chunked"].completion_ids == results["tp1"]["greedy"].completion_ids


@pytest.mark.parametrize("kind", ["top_k1", "top_p_tiny"])
def test_degenerate_filters_equal_greedy(results, kind):
    assert results["tp1"][kind].completion_ids == results["tp1"]["greedy"].completion_ids
    assert all(lp == pytest.approx(0.0, abs=1e-6) for row in results["tp1"][kind].logprobs for lp in row)


@pytest.mark.parametrize("kind", ["temp", "sampled", "top_k", "top_p"])
def test_behaviour_logprobs_equal_full_recompute(results, kind):
    """T != 1: log_softmax(logits / T) at the sampled tokens, renormalised over what the filters keep."""
    _check_logprobs(results, "tp1", kind)


def test_same_seed_same_rollout_and_samples_differ_from_greedy(results):
    tp1 = results["tp1"]
    assert tp1["sampled_again"].completion_ids == tp1["sampled"].completion_ids
    assert tp1["sampled_again"].logprobs == tp1["sampled"].logprobs
    assert tp1["sampled"].completion_ids != tp1["greedy"].completion_ids


def test_any_end_id_ends_a_row(results):
    """``stop_ids`` end a row like ``eos_id`` (kept, reason "eos"); the recompute decoder agrees."""
    tp1 = results["tp1"]
    eos = tp1["eos_id"]
    assert tp1["stop_ids"].completion_ids == tp1["eos"].completion_ids
    assert tp1["stop_ids"].finish_reason == tp1["eos"].finish_reason
    assert "eos" in tp1["stop_ids"].finish_reason
    assert tp1["recompute_stop_ids"] == [
        c[:-1] if c and c[-1] == eos else c for c in tp1["eos"].completion_ids
    ]


def test_eos_stops_one_row_and_the_others_continue(results):
    tp1 = results["tp1"]
    eos, ref, ro = tp1["eos_id"], tp1["greedy"].completion_ids, tp1["eos"]
    for i, (r, c, why) in enumerate(zip(ref, ro.completion_ids, ro.finish_reason)):
        if eos in r:
            assert c == r[: r.index(eos) + 1] and why == "eos", i
        else:  # greedy is unchanged until the new EOS appears; the old EOS no longer stops
            assert c[: len(r)] == r and (why == "length" or c[-1] == eos), i
    assert min(len(c) for c in ro.completion_ids) == 1
    assert max(len(c) for c in ro.completion_ids) == N_NEW


def test_stop_string_stops_and_is_kept(results):
    tp1 = results["tp1"]
    tok, stop = _tokenizer(), tp1["stop_string"]
    stopped = 0
    for r, c, why in zip(tp1["greedy"].completion_ids, tp1["stop"].completion_ids, tp1["stop"].finish_reason):
        cut = next((k for k in range(1, len(r) + 1) if stop in tok.decode(r[:k])), None)
        if cut is None:
            assert c == r and why != "stop"
        else:
            assert c == r[:cut] and why == "stop" and tok.decode(c).endswith(stop)
            stopped += 1
    assert stopped >= 1


def test_teacher_mixture_alpha_zero_has_unit_weights(results):
    ro = results["tp1"]["mixed_a0"]
    assert all(w == 1.0 for row in ro.importance_weights for w in row)
    _check_logprobs(results, "tp1", "mixed_a0")


@pytest.mark.parametrize("kind", ["mixed_a1", "mixed"])
def test_teacher_mixture_logprobs_and_weights(results, kind):
    """alpha = 1: the tokens follow the teacher (behaviour log-probs are the teacher's recomputed ones)
    and the weights are q_student / p_teacher."""
    _check_logprobs(results, "tp1", kind)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("empty_list", "empty prompt list"),
        ("empty_prompt", "prompt 1 is empty"),
        ("too_long", "exceeds max_sequence_length=48"),
        ("bad_token", "outside the vocabulary"),
        ("stop_without_tokenizer", "stop strings need a tokenizer"),
        ("mixed_top_k", "temperature only"),
        ("teacher_vocab", "vocabulary .* differs"),
    ],
)
def test_clear_errors(results, case, message):
    import re

    assert re.search(message, results["tp1"]["errors"][case]), results["tp1"]["errors"][case]


# ---------------------------------------------------------------------------------------------- TP=2, PP=2
@pytest.mark.parametrize("layout", ["tp1", "tp2", "pp2"])
@pytest.mark.parametrize("kind", ["greedy", "sampled", "top_p", "mixed"])
def test_lean_decode_path_equals_megatron_forward(results, layout, kind):
    """The lean decode path and Megatron-core's forward choose the same tokens with the same log-probs
    (and mixture weights) at every layout."""
    lean, megatron = results[layout][kind], results[layout][f"megatron_{kind}"]
    assert lean.completion_ids == megatron.completion_ids
    for a, b in zip(lean.logprobs, megatron.logprobs):
        assert a == pytest.approx(b, abs=1e-6)
    if lean.importance_weights is not None:
        for a, b in zip(lean.importance_weights, megatron.importance_weights):
            assert a == pytest.approx(b, rel=1e-6)


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_greedy_equals_tp1_from_same_checkpoint(results, layout):
    assert results[layout]["greedy"].completion_ids == results["tp1"]["greedy"].completion_ids
    _check_logprobs(results, layout, "greedy")


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
@pytest.mark.parametrize("kind", ["sampled", "unseeded", "top_k", "top_p", "mixed"])
def test_parallel_samples_are_valid_with_tp1_logprobs(results, layout, kind):
    """Tokens are in the real vocabulary (never a padding row), inside the filtered set, and their
    behaviour log-probs equal the TP=1 model's recomputed log-softmax."""
    _check_logprobs(results, layout, kind)


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_every_rank_returns_the_same_rollout(results, layout):
    for kind, ro in results[layout].items():
        other = results["rank1"][layout][kind]
        assert other.completion_ids == ro.completion_ids and other.logprobs == ro.logprobs, kind
