r"""One row block of the fused loss's elementwise work as a single ``torch.compile``-d function.

On one CPU process the fused loss (:mod:`opd_megatron.losses.fused_kl`) runs its softmax and
divergence work on cache-sized row blocks. Eagerly that is ~25 elementwise passes per block, each its
own short parallel region over the threads; at two threads the passes, not the matmuls, are what keeps
the loss above its matmul floor. Here the same formula is written once, functionally, and Inductor
turns it into a few fused loops per block: one read of each side's logits per reduction, the
exponentials and logarithms computed in registers, and one write of the student gradient.

For a block of ``R`` rows with raw student logits ``s``, teacher logits already divided by the
temperature ``t``, and temperature ``tau``:

.. math:: \ell^S = \frac{s - \max s}{\tau} - \log \sum e^{(s - \max s)/\tau}, \quad
          \ell^T = (t - \max t) - \log \sum e^{t - \max t},

then the divergence terms of :func:`~opd_megatron.losses.pointwise.pointwise` (the same code the eager
path runs, here on fresh temporaries), and with gradients

.. math:: \frac{\partial \mathcal L}{\partial s_v} = c \, (g_v - q_v \textstyle\sum_u g_u),

``c`` the token's loss weight times ``1/tau`` and the loss scale (0 where ``token_clip`` clips the
token), formed in float64 and written over ``s``.

The eager path and this one compute the same formula in the same order; they differ only in rounding
(Inductor's vectorised exponentials and its per-lane partial row sums). Used only on one CPU process:
under TP the reductions need collectives between the passes, and on a GPU a block is a whole chunk.

When. Each setting (divergence, its parameters, temperature, clip, block shape, with or without
gradients, with or without -inf teacher logits) compiles once per process, in seconds; after that a
block costs about half the eager time at a vocabulary of 32768 on two threads
(tools/bench/RESULTS_fused_kl.md). So by default (:func:`use_compiled` with ``mode=None``) it runs
where a block is large enough for the saving to repay that within a short run: fp32 and a
vocabulary of at least :data:`AUTO_MIN_VOCAB`. Only full blocks run compiled; a chunk's shorter last
block runs eagerly, so token counts that vary from step to step never trigger a recompile. If
compiling fails in the default mode (no C++ compiler, say), the loss warns once and stays eager.
"""

from __future__ import annotations

import functools
import warnings

import torch

from opd_megatron.losses.pointwise import pointwise

__all__ = ["AUTO_MIN_VOCAB", "BlockKernel", "block_terms", "compiled_block_terms", "use_compiled"]

AUTO_MIN_VOCAB = 16384
"""Smallest local vocabulary at which ``mode=None`` compiles the row block (smaller blocks save too
little per step to repay the compile in a short run)."""

_failure: str | None = None
"""Why compiling failed in this process (then the default mode stays eager from there on)."""


def _shifted(x_RV: torch.Tensor) -> torch.Tensor:
    """``x - max x`` per row; a row that is -inf everywhere is shifted by 0 (not ``-inf - -inf``)."""
    max_R1 = x_RV.amax(dim=-1, keepdim=True)
    return x_RV - torch.where(torch.isfinite(max_R1), max_R1, torch.zeros_like(max_R1))


def block_terms(
    s_RV: torch.Tensor,
    t_RV: torch.Tensor,
    coef_R: torch.Tensor,
    *,
    divergence: str,
    jsd_beta: float,
    skew_alpha: float,
    inv_temperature: float,
    grad_scale: float,
    token_clip: float | None,
    guard: bool,
    grads: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token divergence values ``[R]`` and top-1 agreement ``[R]`` of one row block on one rank;
    with ``grads``, ``dLoss/ds`` written over ``s_RV`` (``t_RV`` is never written).

    ``coef_R`` holds the tokens' loss weights, ``grad_scale`` is ``1/tau`` times the loss scale,
    ``guard`` is set when the teacher logits can hold -inf (see :func:`pointwise`)."""
    s0 = _shifted(s_RV)
    if inv_temperature != 1.0:
        s0 = s0 * inv_temperature
    t0 = _shifted(t_RV)
    # both sides are exactly 0 at their maxima and negative elsewhere (fused_kl._normalise)
    agree_R = (s0 + t0).amax(dim=-1) == 0
    es, et = torch.exp(s0), torch.exp(t0)
    zs_R1, zt_R1 = es.sum(dim=-1, keepdim=True), et.sum(dim=-1, keepdim=True)
    ls, lt = s0 - zs_R1.log(), t0 - zt_R1.log()
    q, p = es / zs_R1, et / zt_R1
    value_R, g = pointwise(
        divergence, lt, ls, p, q, None, None, jsd_beta=jsd_beta, skew_alpha=skew_alpha,
        value=True, grad=grads, guard=guard,
    )  # fmt: skip
    if grads:
        coef = coef_R if token_clip is None else coef_R * (value_R <= token_clip)
        coef = coef * grad_scale
        # In float64 registers, rounded once: the fp32 sum and the two fp32 products of the eager
        # path's last pass add ~3e-7 of error relative to the largest gradient entry at logits of
        # 1e4 with tied maxima, which took TV's weight gradient over the 1e-6 bound (1.25e-6; 7.3e-7
        # this way, for ~4% more block time).
        wide = torch.float64
        coef_R1 = coef.to(wide).unsqueeze(1)
        sum_g_R1 = g.sum(dim=-1, dtype=wide).unsqueeze(1)
        s_RV.copy_(g.to(wide) * coef_R1 - q.to(wide) * (coef_R1 * sum_g_R1))
    return value_R, agree_R


@functools.cache
def compiled_block_terms():
    """:func:`block_terms` compiled once per process (Inductor; one graph per block shape and
    divergence setting, shapes static). The first call of each setting compiles for seconds."""
    import torch._dynamo

    # Dynamo keeps 8 graphs per function by default and runs it uncompiled beyond that; a process
    # that evaluates several divergences (an evaluation sweep, the tests) needs more.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(block_terms, dynamic=False, fullgraph=True)


def use_compiled(
    mode: bool | None, device: torch.device, tp: int, local_vocab: int, dtype: torch.dtype
) -> bool:
    """Whether the fused loss runs its full row blocks compiled: never on a GPU or under TP; with
    ``mode=None`` on fp32 blocks of a vocabulary of at least :data:`AUTO_MIN_VOCAB` while compiling
    has not failed in this process."""
    if device.type != "cpu" or tp != 1 or mode is False:
        return False
    if mode is True:
        return True
    return _failure is None and dtype == torch.float32 and local_vocab >= AUTO_MIN_VOCAB


class BlockKernel:
    """:func:`block_terms` compiled, with one loss's settings bound. Called on a block, returns its
    ``(value_R, agree_R)``, or None when the default mode has given up compiling (then the caller
    runs the block eagerly). ``strict`` (``compile=True``) lets a compile error through instead."""

    def __init__(self, strict: bool, **settings):
        self.strict, self.settings = strict, settings

    def __call__(self, s_RV, t_RV, coef_R, *, guard: bool, grads: bool):
        global _failure
        if _failure is not None and not self.strict:
            return None
        try:
            return compiled_block_terms()(s_RV, t_RV, coef_R, guard=guard, grads=grads, **self.settings)
        except Exception as e:  # an Inductor/compiler failure: the eager path computes the same
            if self.strict:
                raise
            _failure = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            warnings.warn(
                f"fused loss: compiling the row block failed ({_failure}); running it eagerly "
                "(loss.compile_block: never silences this)",
                RuntimeWarning,
                stacklevel=2,
            )
            return None
