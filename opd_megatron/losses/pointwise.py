r"""Per-vocabulary-entry divergence terms and their derivatives, for the fused loss.

Every divergence in :mod:`opd_megatron.losses.divergences` is a sum over the vocabulary of a term that
depends only on that entry's teacher and student log-probs, once the log-normalisers are known. So a
TP rank can sum its own vocabulary shard and the partial sums add up across ranks, and the gradient
w.r.t. the student logits ``s`` (with ``l = s - logsumexp(s)``, ``q = exp(l)``) is

.. math:: \frac{\partial D}{\partial s_v} = g_v - q_v \sum_u g_u, \qquad g_v = \partial D / \partial l_v,

where only :math:`\sum_u g_u` needs a reduction across ranks. This module computes the local value sums
and ``g``; :mod:`opd_megatron.losses.fused_kl` does the rest. The derivatives (``p`` teacher, ``q``
student probabilities, ``m`` the mixture of the divergence):

- forward KL:  ``g = -p``
- reverse KL:  ``g = q (l_S - l_T + 1)``
- JSD(beta), ``m = beta p + (1-beta) q``: ``g = (1-beta) q (l_S - log m)``
- skew forward KL, ``m = alpha p + (1-alpha) q``: ``g = -(1-alpha) p q / m``
- skew reverse KL, ``m = alpha q + (1-alpha) p``: ``g = q (l_S - log m + 1 - alpha q / m)``
- TV: ``g = sign(q - p) q / 2``

The functions write only into the two work buffers they are given (no allocation of ``[C, V]``
tensors: on CPU a fresh large allocation costs more than the arithmetic, on GPU it is just waste).
Given ``None`` for both, they work on temporaries instead: that is how the compiled row block
(:mod:`opd_megatron.losses.compiled_block`) uses them, where Inductor never materialises them.
They are checked against autograd through the reference divergences in the tests.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["pointwise"]


def _mix_into(out, w_a: float, a, b):
    """out = max(w_a * a + (1 - w_a) * b, tiny); the floor keeps log(out) finite where both are 0.
    One ``lerp`` pass (``b + w_a (a - b)``) instead of a multiply and an add. ``out=None``: a new tensor."""
    m = torch.lerp(b, a, w_a, out=out)
    return m.clamp_min_(torch.finfo(m.dtype).tiny)


def pointwise(
    name: str,
    lt: torch.Tensor,
    ls: torch.Tensor,
    p: torch.Tensor,
    q: torch.Tensor,
    work1: torch.Tensor | None,
    work2: torch.Tensor | None,
    *,
    jsd_beta: float = 0.5,
    skew_alpha: float = 0.1,
    value: bool = True,
    grad: bool = False,
    guard: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Local per-token value sums ``[C]`` and/or ``g = dD/dl_S`` ``[C, V]`` (in one of the work buffers).

    ``lt``/``ls`` are teacher/student log-probs and ``p``/``q`` their exponentials, all ``[C, V]`` and
    left untouched. ``guard`` must be set when the teacher log-probs can hold -inf: then the terms
    with zero weight are forced to 0 instead of ``0 * inf = nan`` (student logits come from a matmul
    and are always finite, so only the teacher side needs it).

    Each value sum ``sum_v a_v b_v`` is an in-place product and a row sum, and the product is reused
    for the gradient where the two share it (``q (l_S - log m)`` in JSD); a batched-matmul row dot is
    five times slower on CPU."""
    if name == "jsd" and jsd_beta in (0.0, 1.0):
        name = "forward_kl" if jsd_beta == 0.0 else "reverse_kl"
    if name in ("skew_forward_kl", "skew_reverse_kl") and skew_alpha == 0.0:
        name = name.removeprefix("skew_")
    term = _TERMS.get(name)
    if term is None:
        raise ValueError(f"unknown divergence {name!r}")
    weight = jsd_beta if name == "jsd" else skew_alpha
    return term(_Args(lt, ls, p, q, work1, work2, value, grad, guard), weight)


class _Args(NamedTuple):
    lt: torch.Tensor
    ls: torch.Tensor
    p: torch.Tensor
    q: torch.Tensor
    work1: torch.Tensor | None
    work2: torch.Tensor | None
    value: bool
    grad: bool
    guard: bool


def _forward_kl(a: _Args, _weight: float):
    val = g = None
    if a.value:
        d = torch.sub(a.lt, a.ls, out=a.work1)
        if a.guard:
            d.masked_fill_(a.p == 0, 0.0)
        val = d.mul_(a.p).sum(dim=-1)
    if a.grad:
        g = torch.neg(a.p, out=a.work1)
    return val, g


def _reverse_kl(a: _Args, _weight: float):
    r = torch.sub(a.ls, a.lt, out=a.work1)
    if a.guard:
        r.masked_fill_(a.q == 0, 0.0)
    qr = r.mul_(a.q)
    val = qr.sum(dim=-1) if a.value else None
    g = qr.add_(a.q) if a.grad else None  # q (l_S - l_T + 1)
    return val, g


def _jsd(a: _Args, beta: float):
    val = g = None
    log_m = _mix_into(a.work2, beta, a.p, a.q).log_()
    if a.value:
        d = torch.sub(a.lt, log_m, out=a.work1)
        if a.guard:
            d.masked_fill_(a.p == 0, 0.0)
        val = beta * d.mul_(a.p).sum(dim=-1)
    # finite: log m >= log((1-beta) q) and log m >= log(tiny)
    qd = torch.sub(a.ls, log_m, out=a.work1).mul_(a.q)
    if a.value:
        val = val + (1.0 - beta) * qd.sum(dim=-1)
    if a.grad:
        g = qd.mul_(1.0 - beta)
    return val, g


def _skew_forward_kl(a: _Args, alpha: float):
    val = g = None
    m = _mix_into(a.work2, alpha, a.p, a.q)
    if a.value:
        d = torch.log(m, out=a.work1).neg_().add_(a.lt)
        if a.guard:
            d.masked_fill_(a.p == 0, 0.0)
        val = d.mul_(a.p).sum(dim=-1)
    if a.grad:
        g = torch.mul(a.p, a.q, out=a.work1).div_(m).mul_(-(1.0 - alpha))
    return val, g


def _skew_reverse_kl(a: _Args, alpha: float):
    val = g = None
    m = _mix_into(a.work2, alpha, a.q, a.p)
    r = torch.log(m, out=a.work1).neg_().add_(a.ls)  # finite: m >= alpha q and m >= tiny
    if a.value:
        val = torch.linalg.vecdot(a.q, r)
    if a.grad:
        # q (r + 1 - alpha q / m) in this order: expanding it into q r + q - ... loses precision
        ratio = torch.div(a.q, m, out=a.work2).mul_(alpha)
        g = r.add_(1.0).sub_(ratio).mul_(a.q)
    return val, g


def _tv(a: _Args, _weight: float):
    val = g = None
    d = torch.sub(a.q, a.p, out=a.work1)
    if a.value:
        val = 0.5 * torch.abs(d, out=a.work2).sum(dim=-1)
    if a.grad:
        g = torch.sign(d, out=a.work1).mul_(a.q).mul_(0.5)
    return val, g


_TERMS = {
    "forward_kl": _forward_kl,
    "reverse_kl": _reverse_kl,
    "jsd": _jsd,
    "skew_forward_kl": _skew_forward_kl,
    "skew_reverse_kl": _skew_reverse_kl,
    "tv": _tv,
}
"""One function per divergence: ``(args, its weight: beta or alpha) -> (value sums, g)``."""
