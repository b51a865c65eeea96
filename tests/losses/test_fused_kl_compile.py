"""The fused loss with ``compile=True``: each block's elementwise work as one compiled function. It must
give the eager loss, per-token values and gradients, and keep the gradient bound at large tied logits.

Each divergence setting compiles once per block shape (seconds on CPU), so these cover the common
divergences and the branches the compiled function specialises on (teacher logits that hold -inf,
temperature, the per-token clip, forward without gradients)."""

from __future__ import annotations

import pytest
import torch

from opd_megatron.losses import fused_kl, fused_linear_divergence
from tests.losses.test_fused_kl import _fused, _inputs, _reference, _tied_logits

CASES = [("reverse_kl", {}), ("jsd", {"jsd_beta": 0.5})]


@pytest.fixture(autouse=True)
def _two_blocks_per_chunk(monkeypatch):
    # 37-40 vocabulary rows: 120 elements make 3-row blocks, so chunks of 7 end in an uneven block.
    monkeypatch.setattr(fused_kl, "_CACHE_BLOCK", 120)


@pytest.mark.parametrize("name,kw", CASES, ids=[c[0] for c in CASES])
def test_compiled_equals_eager(name, kw):
    # Teacher logits that rule tokens out (-inf): JSD stays finite; the reverse KL would be infinite.
    hidden, weight, t_hidden, t_weight, t_logits, mask = _inputs(
        T=23, dtype=torch.float32, neg_inf_teacher=name == "jsd"
    )
    opts = dict(chunk_size=7, temperature=0.8, token_clip=2.0, vocab_size=37)
    for teacher in (
        dict(teacher_logits_TV=t_logits),
        dict(teacher_hidden_TH=t_hidden, teacher_weight_VH=t_weight),
    ):
        eager = _fused(hidden, weight, teacher, mask, name, kw, **opts)
        comp = _fused(hidden, weight, teacher, mask, name, kw, compile=True, **opts)
        for a, b, what in zip(comp[:4], eager[:4], ("loss", "grad hidden", "grad weight", "per token")):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=what)
        assert torch.equal(comp[4], eager[4])  # top-1 agreement


def test_compiled_forward_without_gradients():
    hidden, weight, _, _, t_logits, mask = _inputs(T=23, dtype=torch.float32)
    with torch.no_grad():
        outs = [
            fused_linear_divergence(
                hidden, weight, teacher_logits_TV=t_logits, mask_T=mask, chunk_size=7, compile=c
            )
            for c in (False, True)
        ]
    torch.testing.assert_close(outs[1].per_token, outs[0].per_token, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[1].loss, outs[0].loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,kw", CASES, ids=[c[0] for c in CASES])
def test_compiled_gradient_precision_at_large_tied_logits(name, kw):
    """The bound of the eager loss (1e-6 relative to the largest gradient entry, against float64)."""
    g = torch.Generator().manual_seed(7)
    T, V = 12, 24
    hidden, t_logits = _tied_logits(T, V, 1e4, g), _tied_logits(T, V, -1e4, g)
    weight, mask = torch.eye(V), torch.ones(T, dtype=torch.bool)
    _, gh, gw, _, _ = _fused(
        hidden, weight, dict(teacher_logits_TV=t_logits), mask, name, kw, chunk_size=5, compile=True
    )
    ref = _reference(hidden.double(), weight.double(), t_logits.double(), mask, name, kw)
    for got, want, what in ((gh, ref[1], "grad hidden"), (gw, ref[2], "grad weight")):
        err = (got.double() - want).abs().max() / want.abs().max()
        assert err <= 1e-6, f"{what}: relative error {err:.2e}"


def test_loss_config_turns_compilation_on():
    from opd_megatron.config import LossConfig
    from opd_megatron.losses import loss_kwargs

    assert loss_kwargs(LossConfig())["compile"] is False
    assert loss_kwargs(LossConfig(compile=True))["compile"] is True
