"""Fused linear vocab-parallel divergence against the reference divergences, single process and TP=2."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from opd_megatron.config import LossConfig
from opd_megatron.losses import divergence_from_logits, fused_kl, fused_linear_divergence, loss_kwargs
from tests.losses.conftest import DIVERGENCE_CASES, case_id, init_gloo


def _inputs(T=29, H=12, V=40, dtype=torch.float64, seed=0, neg_inf_teacher=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g, dtype=dtype)
    weight = torch.randn(V, H, generator=g, dtype=dtype) * 0.7
    t_hidden = torch.randn(T, H + 3, generator=g, dtype=dtype)
    t_weight = torch.randn(V, H + 3, generator=g, dtype=dtype) * 0.7
    t_logits = t_hidden @ t_weight.T
    if neg_inf_teacher:
        t_logits = t_logits.masked_fill(torch.rand(T, V, generator=g) < 0.2, -torch.inf)
        t_logits[:, 0] = 0.0
    mask = torch.rand(T, generator=g) > 0.25
    return hidden, weight, t_hidden, t_weight, t_logits, mask


def _reference(hidden, weight, t_logits, mask, name, kw, **opts):
    """Loss, grads and per-token values from the reference divergences on full logits (autograd)."""
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss = divergence_from_logits(t_logits, h @ w.T, name, mask=mask, **kw, **opts)
    loss.backward()
    opts.pop("normaliser", None)
    per_token = divergence_from_logits(
        t_logits, (h @ w.T).detach(), name, mask=mask, reduction="none", **kw, **opts
    )
    return loss.detach(), h.grad, w.grad, per_token


def _fused(hidden, weight, teacher, mask, name, kw, **opts):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    out = fused_linear_divergence(h, w, mask_T=mask, divergence=name, **kw, **teacher, **opts)
    out.loss.backward()
    return out.loss.detach(), h.grad, w.grad, out.per_token, out.top1_agree


@pytest.fixture(params=[None, 1, 150], ids=["block=chunk", "block=1row", "block=4rows"])
def cache_block(request, monkeypatch):
    """Rows per elementwise block on CPU (:func:`fused_kl.block_rows`): the whole chunk for the tiny
    vocabularies of these tests unless the cache budget is shrunk (37 valid vocabulary rows: 150
    elements make 4-row blocks, so a 6-token chunk ends in an uneven block)."""
    if request.param is not None:
        monkeypatch.setattr(fused_kl, "_CACHE_BLOCK", request.param)
    return request.param


@pytest.mark.parametrize("teacher_form", ["hidden", "logits"])
@pytest.mark.parametrize("case", DIVERGENCE_CASES, ids=case_id)
def test_matches_reference_float64(case, teacher_form, cache_block):
    name, kw = case
    hidden, weight, t_hidden, t_weight, t_logits, mask = _inputs(neg_inf_teacher=teacher_form == "logits")
    if teacher_form == "hidden":
        teacher = dict(teacher_hidden_TH=t_hidden, teacher_weight_VH=t_weight)
    else:
        teacher = dict(teacher_logits_TV=t_logits)
    if name == "reverse_kl" and teacher_form == "logits":
        # Reverse KL is infinite where the teacher rules out a token the student likes; test it
        # with -inf only where the student's probability is 0 too (the padded rows).
        teacher, t_logits = dict(teacher_logits_TV=t_hidden @ t_weight.T), t_hidden @ t_weight.T
    opts = dict(temperature=1.3, vocab_size=37)
    ref = _reference(hidden, weight, t_logits, mask, name, kw, **opts)
    got = _fused(hidden, weight, teacher, mask, name, kw, chunk_size=6, **opts)
    for a, b, what in zip(got[:4], ref, ("loss", "grad hidden", "grad weight", "per-token")):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10, msg=what)
    assert not got[2][37:].any()  # padded vocabulary rows get no gradient
    s, t = (hidden @ weight.T)[:, :37], t_logits[:, :37]
    torch.testing.assert_close(got[4], mask & (s.argmax(-1) == t.argmax(-1)))


@pytest.mark.parametrize("case", DIVERGENCE_CASES, ids=case_id)
def test_gradcheck(case):
    name, kw = case
    hidden, weight, t_hidden, t_weight, _, mask = _inputs(T=7, H=3, V=9)
    mask[2] = False

    def f(h, w):
        return fused_linear_divergence(
            h, w, teacher_hidden_TH=t_hidden, teacher_weight_VH=t_weight, mask_T=mask, divergence=name,
            chunk_size=4, temperature=0.8, vocab_size=8, **kw,
        ).loss  # fmt: skip

    assert torch.autograd.gradcheck(f, (hidden.requires_grad_(), weight.requires_grad_()))


def _tied_logits(T, V, magnitude, generator):
    """fp32 logits ``magnitude + k`` with integer ``k`` in [-24, 0] (exact in fp32) and the maximum
    reached by two entries of every row."""
    k = torch.randint(-24, 0, (T, V), generator=generator).float()
    top = torch.stack([torch.randperm(V, generator=generator)[:2] for _ in range(T)])
    k.scatter_(1, top, 0.0)
    return magnitude + k


def check_tied_logit_precision(case, teacher_form, **opts):
    """fp32 logits of magnitude 1e4 with tied maxima: the gradient stays within 1e-6 (relative to its
    largest entry) of float64 on the same inputs. An fp32 ``lse = max + log(sum)`` subtracted in one
    step is off by up to half an ulp of 1e4 (5e-4), and so were the gradients built from it."""
    name, kw = case
    g = torch.Generator().manual_seed(7)
    T, V = 12, 24
    # The identity as the output layer makes the hidden states the logits (exact in fp32), so the
    # reference sees the very same logits.
    hidden = _tied_logits(T, V, 1e4, g)
    t_logits = _tied_logits(T, V, -1e4, g)
    weight = torch.eye(V)
    mask = torch.ones(T, dtype=torch.bool)
    mask[3] = False
    teacher = (
        dict(teacher_hidden_TH=t_logits, teacher_weight_VH=torch.eye(V))
        if teacher_form == "hidden"
        else dict(teacher_logits_TV=t_logits)
    )
    loss, gh, gw, per_token, _ = _fused(hidden, weight, teacher, mask, name, kw, chunk_size=5, **opts)
    ref = _reference(hidden.double(), weight.double(), t_logits.double(), mask, name, kw)
    for got, want, what in ((gh, ref[1], "grad hidden"), (gw, ref[2], "grad weight")):
        err = (got.double() - want).abs().max() / want.abs().max()
        assert err <= 1e-6, f"{what}: relative error {err:.2e}"
    torch.testing.assert_close(per_token.double(), ref[3], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.double(), ref[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("teacher_form", ["hidden", "logits"])
@pytest.mark.parametrize("case", DIVERGENCE_CASES, ids=case_id)
def test_gradient_precision_at_large_tied_logits(case, teacher_form, cache_block):
    check_tied_logit_precision(case, teacher_form, compile=False)


def test_float64_loss_weights_are_exact():
    """In float64 the loss weights mask / normaliser are float64: nine identical tokens average to
    their value to the last bit or two (a float32 1/9 is off by 7e-9 relative)."""
    hidden, weight, _, _, t_logits, _ = _inputs(T=1)
    hidden, t_logits = hidden.expand(9, -1), t_logits.expand(9, -1)
    for mask, normaliser in ((None, None), (torch.ones(9), 9.0), (torch.ones(9), torch.tensor(9.0))):
        out = fused_linear_divergence(
            hidden, weight, teacher_logits_TV=t_logits, mask_T=mask, normaliser=normaliser, divergence="jsd"
        )
        assert out.loss.dtype == torch.float64
        assert abs(out.loss.item() / out.per_token[0].item() - 1) < 1e-15


def test_chunk_size_invariance_and_uneven_last_chunk():
    hidden, weight, t_hidden, t_weight, _, mask = _inputs(T=33)
    teacher = dict(teacher_hidden_TH=t_hidden, teacher_weight_VH=t_weight)
    outs = [
        _fused(hidden, weight, teacher, mask, "jsd", {}, chunk_size=c) for c in (1, 4, 7, 32, 33, 1000, None)
    ]
    for out in outs[1:]:
        for a, b in zip(out, outs[0]):
            torch.testing.assert_close(a, b, atol=1e-13, rtol=1e-12)


@settings(max_examples=12, deadline=None)
@given(T=st.integers(1, 24), chunk=st.integers(1, 30), keep=st.floats(0.0, 1.0))
def test_chunking_property(T, chunk, keep):
    hidden, weight, t_hidden, t_weight, _, _ = _inputs(T=T, V=11, H=4)
    mask = torch.rand(T) < keep
    teacher = dict(teacher_hidden_TH=t_hidden, teacher_weight_VH=t_weight)
    a = _fused(hidden, weight, teacher, mask, "skew_reverse_kl", {}, chunk_size=chunk)
    b = _fused(hidden, weight, teacher, mask, "skew_reverse_kl", {}, chunk_size=T)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-13, rtol=1e-12)


def test_all_masked_batch_is_zero_without_nan():
    hidden, weight, t_hidden, t_weight, _, _ = _inputs(dtype=torch.float32)
    hidden[3] = torch.nan  # garbage in dropped rows must not leak
    mask = torch.zeros(hidden.shape[0], dtype=torch.bool)
    for name, kw in DIVERGENCE_CASES:
        loss, gh, gw, per_token, agree = _fused(
            hidden, weight, dict(teacher_hidden_TH=t_hidden, teacher_weight_VH=t_weight), mask, name, kw
        )
        assert loss.item() == 0.0 and not per_token.any() and not agree.any()
        assert torch.equal(gh, torch.zeros_like(gh)) and torch.equal(gw, torch.zeros_like(gw))


@pytest.mark.parametrize("case", DIVERGENCE_CASES, ids=case_id)
def test_extreme_logits_and_neg_inf_teacher_stay_finite(case):
    name, kw = case
    T, H, V = 16, 6, 24
    hidden = torch.randn(T, H)
    weight = torch.randn(V, H) * 3e3  # student logits of order +-1e4
    s = hidden @ weight.T
    t_logits = torch.where(torch.rand(T, V) > 0.5, 1e4, -1e4)
    t_logits = t_logits.masked_fill(
        (torch.rand(T, V) > 0.5) & (s < s.amax(-1, keepdim=True) - 100), -torch.inf
    )
    mask = torch.ones(T, dtype=torch.bool)
    loss, gh, gw, per_token, _ = _fused(
        hidden, weight, dict(teacher_logits_TV=t_logits), mask, name, kw, chunk_size=5
    )
    assert torch.isfinite(loss) and torch.isfinite(gh).all() and torch.isfinite(gw).all()
    ref = divergence_from_logits(t_logits, s, name, reduction="none", **kw)
    torch.testing.assert_close(per_token.double(), ref.double(), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("case", DIVERGENCE_CASES, ids=case_id)
def test_nan_teacher_scores_propagate(case):
    # A broken teacher must show up as a nan loss (which the training loop refuses to step on),
    # never as a silently dropped term.
    name, kw = case
    hidden, weight, _, _, t_logits, mask = _inputs(dtype=torch.float32)
    t_logits = t_logits.float()
    t_logits[mask.nonzero()[0, 0], 3] = torch.nan
    out = fused_linear_divergence(
        hidden, weight, teacher_logits_TV=t_logits, mask_T=mask, divergence=name, **kw
    )
    assert torch.isnan(out.loss)
    assert torch.isnan(divergence_from_logits(t_logits, hidden @ weight.T, name, mask=mask, **kw))


def test_token_clip_t2_scaling_weights_and_normaliser():
    hidden, weight, t_hidden, t_weight, t_logits, _ = _inputs()
    weights = torch.rand(hidden.shape[0], dtype=torch.float64)
    weights[::4] = 0
    teacher = dict(teacher_hidden_TH=t_hidden, teacher_weight_VH=t_weight)
    tau, T, N = 2.0, 1.7, 11.0
    loss, gh, gw, per_token, _ = _fused(
        hidden, weight, teacher, weights, "reverse_kl", {}, token_clip=tau, temperature=T, scale_by_t2=True,
        normaliser=N, chunk_size=5,
    )  # fmt: skip
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    d = divergence_from_logits(t_logits, h @ w.T, "reverse_kl", temperature=T, reduction="none")
    assert (d > tau).any() and (d < tau).any()
    ref = (weights * d.clamp(max=tau)).sum() * T**2 / N
    ref.backward()
    torch.testing.assert_close(loss, ref.detach())
    torch.testing.assert_close(gh, h.grad)
    torch.testing.assert_close(gw, w.grad)
    torch.testing.assert_close(per_token, torch.where(weights > 0, d, 0).detach())


def test_bf16_inputs_accumulate_in_fp32():
    hidden, weight, t_hidden, t_weight, t_logits, mask = _inputs(T=40, H=32, V=64, dtype=torch.float32)
    bf = [x.bfloat16() for x in (hidden, weight, t_hidden, t_weight)]
    teacher = dict(teacher_hidden_TH=bf[2], teacher_weight_VH=bf[3])
    loss, gh, gw, per_token, _ = _fused(bf[0], bf[1], teacher, mask, "jsd", {}, chunk_size=16)
    assert loss.dtype == torch.float32 and gh.dtype == gw.dtype == torch.bfloat16
    ref = _reference(*(x.float() for x in (bf[0], bf[1])), (bf[2].float() @ bf[3].float().T), mask, "jsd", {})
    torch.testing.assert_close(loss, ref[0], rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(gh.float(), ref[1], rtol=5e-2, atol=2e-3)
    torch.testing.assert_close(gw.float(), ref[2], rtol=5e-2, atol=2e-3)


def test_leading_dims_frozen_head_and_no_grad():
    hidden, weight, t_hidden, t_weight, t_logits, mask = _inputs(T=24)
    h = hidden.reshape(6, 4, -1).requires_grad_()
    out = fused_linear_divergence(
        h, weight, teacher_logits_TV=t_logits.reshape(6, 4, -1), mask_T=mask.reshape(6, 4)
    )
    out.loss.backward()  # frozen output layer: only the hidden states get a gradient
    assert out.per_token.shape == (6, 4) and h.grad.shape == h.shape
    ref = _reference(hidden, weight, t_logits, mask, "reverse_kl", {})
    torch.testing.assert_close(h.grad.reshape(24, -1), ref[1])
    with torch.no_grad():
        out = fused_linear_divergence(hidden, weight, teacher_logits_TV=t_logits, mask_T=mask)
    torch.testing.assert_close(out.loss, ref[0])


def test_upstream_gradient_and_second_backward():
    hidden, weight, t_hidden, t_weight, t_logits, mask = _inputs()
    ref = _reference(hidden, weight, t_logits, mask, "jsd", {})
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    out = fused_linear_divergence(h, w, teacher_logits_TV=t_logits, mask_T=mask, divergence="jsd")
    (out.loss * 3.0).backward(retain_graph=True)
    torch.testing.assert_close(h.grad, 3.0 * ref[1])
    out.loss.backward(retain_graph=True)
    out.loss.backward()
    torch.testing.assert_close(h.grad, 5.0 * ref[1])
    torch.testing.assert_close(w.grad, 5.0 * ref[2])


def test_never_allocates_tokens_by_vocab():
    T, H, V, C = 256, 4, 128, 16
    hidden = torch.randn(T, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    with torch.profiler.profile(profile_memory=True) as prof:
        out = fused_linear_divergence(
            hidden,
            weight,
            teacher_hidden_TH=torch.randn(T, H),
            teacher_weight_VH=torch.randn(V, H),
            chunk_size=C,
        )
        out.loss.backward()
    largest = max(e.cpu_memory_usage for e in prof.events() if e.name.startswith("aten::"))
    assert 0 < largest <= C * V * 4 < T * V * 4 // 8
    # What forward keeps for backward: the gradients [T, H] and [V, H], the per-token outputs and the
    # kept token indices, nothing [T, V]-sized.
    held = max(e.cpu_memory_usage for e in prof.events() if e.name == "FusedLinearDivergence")
    assert held <= 4 * (T * H + V * H) + 16 * T + 64 < T * V * 4 // 8


def test_config_kwargs_and_validation():
    kw = loss_kwargs(LossConfig(divergence="jsd", jsd_beta=0.2, temperature=2.0, chunk_size=8))
    hidden, weight, t_hidden, t_weight, t_logits, mask = _inputs()
    out = fused_linear_divergence(hidden, weight, teacher_logits_TV=t_logits, **kw)
    ref = divergence_from_logits(t_logits, hidden @ weight.T, "jsd", jsd_beta=0.2, temperature=2.0)
    torch.testing.assert_close(out.loss, ref)
    with pytest.raises(ValueError, match="teacher"):
        fused_linear_divergence(hidden, weight)
    with pytest.raises(ValueError, match="teacher logits"):
        fused_linear_divergence(hidden, weight, teacher_logits_TV=t_logits[:, :5])
    with pytest.raises(ValueError, match="unknown divergence"):
        fused_linear_divergence(hidden, weight, teacher_logits_TV=t_logits, divergence="kl")
    with pytest.raises(ValueError, match="vocab_size"):
        fused_linear_divergence(hidden, weight, teacher_logits_TV=t_logits, vocab_size=41)
    with pytest.raises(ValueError, match="mask"):
        fused_linear_divergence(hidden, weight, teacher_logits_TV=t_logits, mask_T=mask[:3])


# ----------------------------------------------------------------------------------------------------
# TP = 2 on gloo
# ----------------------------------------------------------------------------------------------------

TP_CASES = [(name, kw, form, 7, 60) for name, kw in DIVERGENCE_CASES for form in ("hidden", "logits")] + [
    ("reverse_kl", {}, "hidden", 64, None),  # one chunk, no padding
    ("jsd", {}, "hidden", 3, 30),  # rank 1 holds only padded rows
    ("forward_kl", {}, "logits", 1, 61),
]


def _tp_inputs(name, form):
    hidden, weight, t_hidden, t_weight, t_logits, mask = _inputs(
        T=23, H=10, V=64, dtype=torch.float32, seed=3
    )
    if form == "logits" and name != "reverse_kl":
        t_logits = t_logits.masked_fill(
            torch.rand(t_logits.shape, generator=torch.Generator().manual_seed(5)) < 0.1, -torch.inf
        )
        t_logits[:, 0] = 0.0
    return hidden, weight, t_hidden, t_weight, t_logits, mask


def tp2_worker(rank: int):
    group = init_gloo()
    results = []
    for name, kw, form, chunk, vocab_size in TP_CASES:
        hidden, weight, t_hidden, t_weight, t_logits, mask = _tp_inputs(name, form)
        shard = slice(rank * 32, (rank + 1) * 32)
        if form == "hidden":
            teacher = dict(teacher_hidden_TH=t_hidden, teacher_weight_VH=t_weight[shard])
        else:
            teacher = dict(teacher_logits_TV=t_logits[:, shard])
        results.append(
            _fused(
                hidden,
                weight[shard],
                teacher,
                mask,
                name,
                kw,
                chunk_size=chunk,
                temperature=1.5,
                vocab_size=vocab_size,
                tp_group=group,
            )  # fmt: skip
        )
    # A batch with no loss tokens at all.
    hidden, weight, t_hidden, t_weight, _, mask = _tp_inputs("jsd", "hidden")
    empty = _fused(
        hidden, weight[rank * 32 : (rank + 1) * 32], dict(teacher_hidden_TH=t_hidden, teacher_weight_VH=t_weight[rank * 32 : (rank + 1) * 32]),
        torch.zeros_like(mask), "jsd", {}, tp_group=group,
    )  # fmt: skip
    return results, empty


@pytest.fixture(scope="module")
def tp2_results(tp2):
    return [rank["fused"] for rank in tp2]


@pytest.mark.parametrize(
    "i",
    range(len(TP_CASES)),
    ids=[f"{case_id(c[:2])}-{c[2]}-c{c[3]}-v{c[4]}" for c in TP_CASES],
)
def test_tp2_equals_single_process_reference(tp2_results, i):
    name, kw, form, _, vocab_size = TP_CASES[i]
    (r0, _), (r1, _) = tp2_results
    hidden, weight, t_hidden, t_weight, t_logits, mask = _tp_inputs(name, form)
    if form == "hidden":
        t_logits = t_hidden @ t_weight.T
    loss, gh, gw, per_token = _reference(
        hidden, weight, t_logits, mask, name, kw, temperature=1.5, vocab_size=vocab_size
    )
    for rank_result in (r0[i], r1[i]):
        torch.testing.assert_close(rank_result[0], loss, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rank_result[1], gh, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rank_result[3], per_token, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([r0[i][2], r1[i][2]]), gw, atol=1e-5, rtol=1e-5)
    V = vocab_size or 64
    s, t = (hidden @ weight.T)[:, :V] / 1.5, t_logits[:, :V] / 1.5
    torch.testing.assert_close(r0[i][4], mask & (s.argmax(-1) == t.argmax(-1)))
    torch.testing.assert_close(r1[i][4], r0[i][4])


def test_tp2_all_masked(tp2_results):
    for _, (loss, gh, gw, per_token, agree) in tp2_results:
        assert (
            loss.item() == 0.0 and not gh.any() and not gw.any() and not per_token.any() and not agree.any()
        )
