"""The fused loss's compiled row block: same results as the reference and the eager path, when it is
used, and what happens when compiling fails."""

from __future__ import annotations

import warnings

import pytest
import torch

from opd_megatron.config import ConfigError, LossConfig
from opd_megatron.losses import compiled_block, fused_kl, fused_linear_divergence, loss_kwargs
from opd_megatron.losses.compiled_block import AUTO_MIN_VOCAB, BlockKernel, use_compiled
from tests.losses.conftest import DIVERGENCE_CASES, case_id
from tests.losses.test_fused_kl import _fused, _inputs, _reference, check_tied_logit_precision


@pytest.fixture
def counted(monkeypatch):
    """Counts the compiled function's calls (the real one runs)."""
    real, calls = compiled_block.compiled_block_terms(), []

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(compiled_block, "compiled_block_terms", lambda: counting)
    return calls


@pytest.mark.parametrize("teacher_form", ["hidden", "logits"])
@pytest.mark.parametrize("case", DIVERGENCE_CASES, ids=case_id)
def test_compiled_matches_reference_float64(case, teacher_form, counted, monkeypatch):
    """Every divergence, teacher logits with -inf, temperature, padded vocabulary rows, 4-row blocks
    (compiled) and a shorter last block (eager) in one call."""
    monkeypatch.setattr(fused_kl, "_CACHE_BLOCK", 150)  # 37 valid rows: 4-row blocks
    name, kw = case
    hidden, weight, t_hidden, t_weight, t_logits, mask = _inputs(neg_inf_teacher=teacher_form == "logits")
    teacher = (
        dict(teacher_hidden_TH=t_hidden, teacher_weight_VH=t_weight)
        if teacher_form == "hidden"
        else dict(teacher_logits_TV=t_logits)
    )
    if name == "reverse_kl" and teacher_form == "logits":  # as in test_fused_kl: finite reverse KL
        teacher, t_logits = dict(teacher_logits_TV=t_hidden @ t_weight.T), t_hidden @ t_weight.T
    opts = dict(temperature=1.3, vocab_size=37)
    ref = _reference(hidden, weight, t_logits, mask, name, kw, **opts)
    got = _fused(hidden, weight, teacher, mask, name, kw, chunk_size=6, compile=True, **opts)
    for a, b, what in zip(got[:4], ref, ("loss", "grad hidden", "grad weight", "per-token")):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10, msg=what)
    assert not got[2][37:].any()
    s, t = (hidden @ weight.T)[:, :37], t_logits[:, :37]
    torch.testing.assert_close(got[4], mask & (s.argmax(-1) == t.argmax(-1)))
    # chunks of 6 kept tokens: a 4-row block (compiled) and a 2-row block (eager); the last chunk's
    # 4-row block, if it has one, compiled too
    n = int(mask.sum())
    assert counted == [torch.Size([4, 37])] * (n // 6 + (n % 6) // 4)


@pytest.mark.parametrize("teacher_form", ["hidden", "logits"])
@pytest.mark.parametrize("case", DIVERGENCE_CASES, ids=case_id)
def test_compiled_gradient_precision_at_large_tied_logits(case, teacher_form, counted):
    """The held-out precision case of test_fused_kl (fp32 logits of 1e4 with tied maxima, gradient
    within 1e-6 of float64) in the compiled mode."""
    check_tied_logit_precision(case, teacher_form, compile=True)
    assert counted  # the 5-token chunks are full blocks: they ran compiled


def _large_vocab_inputs(V=AUTO_MIN_VOCAB, T=16, H=8):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(T, H, generator=g).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 0.5).requires_grad_()
    t_hidden, t_weight = torch.randn(T, H, generator=g), torch.randn(V, H, generator=g) * 0.5
    return hidden, weight, dict(teacher_hidden_TH=t_hidden, teacher_weight_VH=t_weight)


def _loss_and_grads(hidden, weight, teacher, **kw):
    hidden.grad = weight.grad = None
    out = fused_linear_divergence(hidden, weight, divergence="jsd", token_clip=0.4, **teacher, **kw)
    out.loss.backward()
    return out.loss.detach(), out.per_token, hidden.grad.clone(), weight.grad.clone()


def test_default_compiles_at_large_vocabulary_and_equals_eager(counted):
    """fp32 at V = AUTO_MIN_VOCAB: the default runs full blocks compiled (here with the per-token clip,
    which depends on each token's complete value), and agrees with the eager path up to rounding."""
    hidden, weight, teacher = _large_vocab_inputs()
    eager = _loss_and_grads(hidden, weight, teacher, compile=False)
    assert counted == []
    default = _loss_and_grads(hidden, weight, teacher)
    assert counted and all(s[1] == AUTO_MIN_VOCAB for s in counted)
    for a, b in zip(default, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # the clip is active for some tokens and not for others (else this would not test it)
    assert 0 < int((eager[1] > 0.4).sum()) < eager[1].numel()


def test_small_vocabulary_and_float64_stay_eager_by_default(counted):
    hidden, weight, t_hidden, t_weight, t_logits, mask = _inputs(dtype=torch.float32)
    _fused(hidden, weight, dict(teacher_logits_TV=t_logits), mask, "jsd", {})
    hidden, weight, t_hidden, t_weight, t_logits, mask = _inputs(T=4, V=AUTO_MIN_VOCAB, dtype=torch.float64)
    _fused(hidden, weight, dict(teacher_logits_TV=t_logits), mask, "jsd", {})
    assert counted == []


def test_use_compiled_rules():
    cpu, f32 = torch.device("cpu"), torch.float32
    assert use_compiled(None, cpu, 1, AUTO_MIN_VOCAB, f32)
    assert not use_compiled(None, cpu, 1, AUTO_MIN_VOCAB - 1, f32)
    assert not use_compiled(None, cpu, 1, AUTO_MIN_VOCAB, torch.float64)
    assert use_compiled(True, cpu, 1, 8, torch.float64)
    assert not use_compiled(False, cpu, 1, AUTO_MIN_VOCAB, f32)
    assert not use_compiled(True, cpu, 2, AUTO_MIN_VOCAB, f32)  # TP: collectives between the passes
    assert not use_compiled(True, torch.device("meta"), 1, AUTO_MIN_VOCAB, f32)


def _failing_compile(calls):
    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found\nmore detail")

    return lambda: broken


def test_failed_compile_falls_back_to_eager_with_one_warning(monkeypatch):
    calls = []
    monkeypatch.setattr(compiled_block, "compiled_block_terms", _failing_compile(calls))
    monkeypatch.setattr(compiled_block, "_failure", None)
    hidden, weight, teacher = _large_vocab_inputs()
    with pytest.warns(RuntimeWarning, match="compiling the row block failed .*no working C\\+\\+ compiler"):
        got = _loss_and_grads(hidden, weight, teacher)
    assert calls == [1]  # given up after the first failure, not retried per block
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per process
        again = _loss_and_grads(hidden, weight, teacher)
    assert calls == [1]
    want = _loss_and_grads(hidden, weight, teacher, compile=False)
    for a, b, c in zip(got, again, want):
        torch.testing.assert_close(a, c, rtol=0, atol=0)
        torch.testing.assert_close(b, c, rtol=0, atol=0)
    # compile=True does not hide the error
    with pytest.raises(RuntimeError, match="no working C\\+\\+ compiler"):
        _loss_and_grads(hidden, weight, teacher, compile=True)


def test_block_kernel_returns_none_once_given_up(monkeypatch):
    monkeypatch.setattr(compiled_block, "_failure", "RuntimeError: earlier")
    kernel = BlockKernel(False, divergence="jsd", jsd_beta=0.5, skew_alpha=0.1, inv_temperature=1.0,
                         grad_scale=1.0, token_clip=None)  # fmt: skip
    s, t = torch.zeros(2, 4), torch.zeros(2, 4)
    assert kernel(s, t, torch.ones(2), guard=False, grads=True) is None


def test_config_field():
    assert loss_kwargs(LossConfig())["compile"] is None
    assert loss_kwargs(LossConfig(compile_block="always"))["compile"] is True
    assert loss_kwargs(LossConfig(compile_block="never"))["compile"] is False
    with pytest.raises(ConfigError, match="compile_block"):
        LossConfig(compile_block="sometimes")
