r"""Fused linear, vocab-parallel divergence: the lm-head matmul and the distillation loss in one pass.

The student's output layer is a ColumnParallelLinear: rank ``r`` holds rows ``[r V/n, (r+1) V/n)`` of
the weight. Instead of materialising logits ``[T, V]`` (or even ``[T, V/n]``) this loss walks over
chunks of ``C`` tokens and, per chunk,

1. computes the chunk's logits shard ``s = h_C @ W^T`` (and the teacher's ``t``, or copies the rows
   of the teacher's given logits shard);
2. per block of rows: gets each side's log-probs, ``log q = (s - max) / tau - log sum exp(...)``,
   with the max and the sum of exponentials all-reduced over the TP group;
3. sums the divergence terms of its vocabulary shard (:mod:`~opd_megatron.losses.pointwise`) and forms
   ``dD/ds = g - q * sum(g)`` (one all-reduce of ``[R]``), written over the block's logits;
4. ``grad_h = dD/ds @ W`` (all-reduced over TP once at the end, since every rank's shard contributes)
   and ``grad_W += dD/ds^T @ h``.

The gradients are formed during forward, right after each chunk's loss, and held until backward (as
Liger's chunked losses do): the loss is backpropagated right after it is computed in a training step,
so holding ``grad_W`` ``[V/n, H]`` and ``grad_h`` ``[T, H]`` for that moment costs nothing extra
against forming them in backward. Matmul count: 4 lm-head-sized matmuls (student logits, teacher
logits, ``grad_h``, ``grad_W``), the floor. (Recomputing the chunk logits in backward instead takes 6,
so at least 1.5x the floor, for the same peak memory; tools/bench/RESULTS_fused_kl.md.)

Blocks. On one CPU process (no TP) the softmax and divergence work of step 2-3 runs on blocks of a few
rows (:func:`block_rows`, about 1 MiB per buffer) rather than on the whole chunk: the ~25 elementwise
passes then read and write cache, not memory, and the per-block work buffers are small. Peak extra
memory is then the ``[C, V/n]`` student buffer (plus one for the teacher's logits when it is given as
hidden states), the ``[V/n, H]`` weight-gradient accumulator and ``grad_h``. On a GPU, or under TP
(where every block costs collectives), a block is the whole chunk: six ``[C, V/n]`` buffers.
At large vocabularies a full CPU block's work runs as one ``torch.compile``-d function instead of the
eager passes (:mod:`~opd_megatron.losses.compiled_block`; the ``compile`` argument).

Tokens with mask weight 0 are dropped before any matmul (prompt tokens cost nothing), so an all-masked
batch gives a zero loss and zero gradients. Padded vocabulary rows (global index >= ``vocab_size``)
are excluded on both sides: their logits are never computed and their weight gradient is 0.

Inputs in bf16/fp16: the matmuls run in the input dtype (fp32 accumulation inside the GEMM) and the
logits are upcast; softmax, divergence, per-token sums, the loss weights (``mask / normaliser``) and the
weight-gradient accumulation across chunks are fp32 (fp64 for fp64 inputs, which is what gradcheck
uses).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

from opd_megatron.losses.compiled_block import BlockKernel, use_compiled
from opd_megatron.losses.divergences import check_divergence
from opd_megatron.losses.pointwise import pointwise
from opd_megatron.losses.tp import all_reduce, tp_size, vocab_range

__all__ = [
    "FusedDivergenceOutput",
    "FusedLinearDivergence",
    "fused_linear_divergence",
    "auto_chunk_size",
    "loss_kwargs",
]


class FusedDivergenceOutput(NamedTuple):
    loss: torch.Tensor
    """Scalar: ``scale * sum_t w_t * D_t / normaliser`` (``scale`` = T^2 or 1; ``D_t`` clipped at
    ``token_clip`` when given). Differentiable w.r.t. the student hidden states and weight."""
    per_token: torch.Tensor
    """``[T]`` divergence ``D_t`` of each token (detached; unweighted, unscaled, unclipped; 0 where masked)."""
    top1_agree: torch.Tensor
    """``[T]`` bool: the student's and the teacher's most likely token are the same (with ties: some
    token is most likely under both; False where masked)."""


@dataclass(frozen=True)
class _Spec:
    divergence: str
    jsd_beta: float
    skew_alpha: float
    inv_temperature: float
    loss_scale: float
    chunk_size: int
    vocab_size: int | None
    token_clip: float | None
    grads: bool
    compile: bool | None = None


_CACHE_BLOCK = 1 << 18
"""Elements per ``[R, V/tp]`` work buffer of a CPU block (1 MiB in fp32): the block's five buffers stay
in a core's L2 (2 MiB here) and the shared L3 (tools/bench/bench_fused_kl.py ``--block``)."""


def auto_chunk_size(local_vocab: int, budget_elements: int = 1 << 25) -> int:
    """Tokens per chunk such that one ``[C, V/tp]`` fp32 buffer holds about ``budget_elements``
    (128 MiB by default; the loss keeps one or two of them on one CPU process, six on a GPU or
    under TP). At least 16, a multiple of 16.

    Larger chunks make the matmuls more efficient (on CPU, 1024 tokens instead of 128 at V = 131072
    saves about a quarter of the time) at a memory cost linear in the chunk."""
    return max(16, (budget_elements // max(local_vocab, 1)) // 16 * 16)


def loss_kwargs(cfg) -> dict:
    """Keyword arguments of :func:`fused_linear_divergence` taken from a ``LossConfig``."""
    return dict(
        divergence=cfg.divergence,
        jsd_beta=cfg.jsd_beta,
        skew_alpha=cfg.skew_alpha,
        temperature=cfg.temperature,
        scale_by_t2=cfg.scale_by_t2,
        chunk_size=cfg.chunk_size,
        compile={"auto": None, "always": True, "never": False}[cfg.compile_block],
    )


# ----------------------------------------------------------------------------------------------------
# Chunk helpers
# ----------------------------------------------------------------------------------------------------


def block_rows(chunk: int, local_vocab: int, device: torch.device, group) -> int:
    """Rows of a chunk whose softmax and divergence work runs in one go (see the module docstring).

    On one CPU process a block of about ``_CACHE_BLOCK`` elements per buffer keeps the ~25 elementwise
    passes in cache; elsewhere the whole chunk is one block (a GPU streams it at full bandwidth, and
    under TP every block costs three collectives)."""
    if device.type != "cpu" or tp_size(group) > 1:
        return chunk
    return max(1, min(chunk, _CACHE_BLOCK // max(local_vocab, 1)))


def _take(x: torch.Tensor, rows: torch.Tensor | None, c0: int, c1: int) -> torch.Tensor:
    """Rows ``c0:c1`` of the loss tokens: a view when every token is kept, else a gather."""
    return x[c0:c1] if rows is None else x.index_select(0, rows[c0:c1])


def _logits_into(out_CV: torch.Tensor, h_CH: torch.Tensor, w_VH: torch.Tensor) -> None:
    if h_CH.dtype == out_CV.dtype:
        torch.matmul(h_CH, w_VH.t(), out=out_CV)
    else:
        out_CV.copy_(h_CH @ w_VH.t())


class _Inputs(NamedTuple):
    hidden: torch.Tensor
    weight: torch.Tensor  # [V_valid, H]: padded vocabulary rows already sliced off
    t_hidden: torch.Tensor | None
    t_weight: torch.Tensor | None
    t_logits: torch.Tensor | None  # [T, V_valid] view
    rows: torch.Tensor | None


def _inputs(hidden, weight, t_hidden, t_weight, t_logits, rows_N, n_valid: int) -> _Inputs:
    """Slice off the padded vocabulary rows; keep ``rows`` only when some tokens are dropped."""
    return _Inputs(
        hidden,
        weight[:n_valid],
        t_hidden,
        None if t_weight is None else t_weight[:n_valid],
        None if t_logits is None else t_logits[:, :n_valid],
        None if rows_N.numel() == hidden.shape[0] else rows_N,
    )


def _teacher_rows(x: _Inputs, t_RV, c0: int, r0: int, r1: int, inv_temp: float) -> bool:
    """Divide the teacher logits of block rows ``r0:r1`` (of the chunk starting at token ``c0``) by the
    temperature in ``t_RV``, first copying them in when the teacher is given as logits (those are
    never modified); returns whether they can hold -inf (only given teacher logits can)."""
    guard = False
    if x.t_logits is not None:
        if x.rows is None:
            t_RV.copy_(x.t_logits[c0 + r0 : c0 + r1])
        else:
            torch.index_select(x.t_logits, 0, x.rows[c0 + r0 : c0 + r1], out=t_RV)
        guard = t_RV.numel() > 0 and bool(torch.isneginf(t_RV.amin()))
    if inv_temp != 1.0:
        t_RV.mul_(inv_temp)
    return guard


def _normalise(s_RV, q_RV, t_RV, p_RV, group, inv_temp: float) -> torch.Tensor:
    """Turn the student's logits ``s`` (unscaled) and the teacher's ``t`` (already divided by the
    temperature) into log-probs in place and fill the probabilities ``q``, ``p``, with normalisers
    over the whole (TP-split) vocabulary. Returns the top-1 agreement ``[R]``.

    ``log q = (s - max) / tau - log sum exp((s - max) / tau)``: the max and the log-sum are
    subtracted one after the other, never as one rounded ``lse``, so a log-prob near 0 keeps full
    precision whatever the logits' magnitude (with logits of 1e4 an fp32 ``lse`` is off by 5e-4).

    Top-1 agreement: after the max is subtracted, both sides are exactly 0 at their maxima and
    negative elsewhere, so ``max_v (s'_v + t'_v) == 0`` exactly when some token is most likely under
    both (one add and one max per entry; an argmax costs ten times that on CPU). Its per-rank
    indicator rides in the all-reduce of the sums."""
    R = s_RV.shape[0]
    if s_RV.shape[1]:
        max_2R = torch.stack([s_RV.amax(dim=-1), t_RV.amax(dim=-1)])
    else:  # this rank holds only padded rows
        max_2R = s_RV.new_full((2, R), -torch.inf)
    all_reduce(max_2R, group, dist.ReduceOp.MAX)
    # A row that is -inf everywhere would give (-inf) - (-inf) = nan; shift it by 0 instead.
    max_2R = torch.where(torch.isfinite(max_2R), max_2R, torch.zeros_like(max_2R))
    s_RV.sub_(max_2R[0].unsqueeze(1))
    if inv_temp != 1.0:
        s_RV.mul_(inv_temp)
    t_RV.sub_(max_2R[1].unsqueeze(1))
    if s_RV.shape[1]:
        both_R = torch.add(s_RV, t_RV, out=q_RV).amax(dim=-1) == 0
    else:
        both_R = torch.zeros(R, dtype=torch.bool, device=s_RV.device)
    torch.exp(s_RV, out=q_RV)
    torch.exp(t_RV, out=p_RV)
    # [R, V/tp] -> [R]: both sides' sums of exponentials and this rank's agreement indicator
    sum_3R = torch.stack([q_RV.sum(dim=-1), p_RV.sum(dim=-1), both_R.to(q_RV.dtype)])
    all_reduce(sum_3R, group)
    s_RV.sub_(sum_3R[0].log().unsqueeze(1))
    t_RV.sub_(sum_3R[1].log().unsqueeze(1))
    q_RV.div_(sum_3R[0].unsqueeze(1))
    p_RV.div_(sum_3R[1].unsqueeze(1))
    return sum_3R[2] > 0


def _student_grad_into(out_RV, g_RV, q_RV, coef_R, group) -> None:
    """``out = coef * (g - q * sum(g))`` = dLoss/ds; ``sum`` runs over the TP-split vocabulary."""
    sum_g_R = all_reduce(g_RV.sum(dim=-1), group)  # [R, V/tp] -> [R]
    torch.mul(g_RV, coef_R.unsqueeze(1), out=out_RV)
    out_RV.addcmul_(q_RV, (coef_R * sum_g_R).unsqueeze(1), value=-1.0)


def _accumulate_grads(ds_CV, h_CH, x: _Inputs, grad_h_NH, grad_w_VH, c0: int, c1: int) -> None:
    if grad_h_NH is not None:
        if ds_CV.dtype == x.weight.dtype:
            torch.matmul(ds_CV, x.weight, out=grad_h_NH[c0:c1])
        else:
            grad_h_NH[c0:c1] = ds_CV.to(x.weight.dtype) @ x.weight
    if grad_w_VH is not None:
        grad_w_VH.addmm_(ds_CV.t(), h_CH.to(grad_w_VH.dtype))


def _clip_values(value_N, spec: _Spec):
    return value_N if spec.token_clip is None else value_N.clamp(max=spec.token_clip)


def _grad_coef(coef_N, value_N, spec: _Spec):
    """Per-token gradient coefficient (the chain rule through ``s = h W^T / T`` included):
    ``min(D, tau)`` has zero gradient where ``D > tau``."""
    if spec.token_clip is not None:
        coef_N = coef_N * (value_N <= spec.token_clip)
    return coef_N * (spec.inv_temperature * spec.loss_scale)


def _block_work(s_RV, t_RV, q_RV, p_RV, w1_RV, w2_RV, coef_R, spec: _Spec, guard: bool, grads: bool, group):
    """The elementwise work of one row block: both softmaxes, the divergence's per-token values
    ``[R]`` (all-reduced here only when ``grads``; else the caller reduces them once at the end), the
    top-1 agreement ``[R]``, and with ``grads`` the gradient w.r.t. the student logits, left in
    ``s_RV``. The teacher logits in ``t_RV`` are already divided by the temperature."""
    agree_R = _normalise(s_RV, q_RV, t_RV, p_RV, group, spec.inv_temperature)
    value_R, g = pointwise(
        spec.divergence, t_RV, s_RV, p_RV, q_RV, w1_RV, w2_RV, jsd_beta=spec.jsd_beta,
        skew_alpha=spec.skew_alpha, value=True, grad=grads, guard=guard,
    )  # fmt: skip
    if grads:
        # The clip needs each token's complete value before its gradient: reduce it per block.
        all_reduce(value_R, group)
        coef_R = _grad_coef(coef_R, value_R, spec)
        _student_grad_into(s_RV, g, q_RV, coef_R, group)  # the log-probs are done with
    return value_R, agree_R


def _block_kernel(spec: _Spec, V: int, dtype: torch.dtype, dev: torch.device, group) -> BlockKernel | None:
    """The compiled row block with this loss's settings bound, where it applies; else None."""
    if not use_compiled(spec.compile, dev, tp_size(group), V, dtype):
        return None
    return BlockKernel(
        spec.compile is True, divergence=spec.divergence, jsd_beta=spec.jsd_beta,
        skew_alpha=spec.skew_alpha, inv_temperature=spec.inv_temperature,
        grad_scale=spec.inv_temperature * spec.loss_scale, token_clip=spec.token_clip,
    )  # fmt: skip


def _chunks(x: _Inputs, spec: _Spec, group, coef_N, grad_h_NH, grad_w_VH):
    """Per-token values and top-1 agreement; when ``grad_h_NH`` / ``grad_w_VH`` are given, also the
    gradients (not yet scaled by the upstream gradient), accumulated into them."""
    N, acc, dev = coef_N.shape[0], coef_N.dtype, coef_N.device
    grads = grad_h_NH is not None or grad_w_VH is not None
    value_N = torch.zeros(N, dtype=acc, device=dev)
    agree_N = torch.zeros(N, dtype=torch.bool, device=dev)
    V = x.weight.shape[0]
    C = max(1, min(spec.chunk_size, N))
    R = block_rows(C, V, dev, group)
    s_CV = torch.empty(C, V, dtype=acc, device=dev)
    # Teacher logits from hidden states come from one matmul per chunk and are worked on in place;
    # given ones are copied in block by block (they are never modified).
    t_CV = torch.empty(C if x.t_logits is None else R, V, dtype=acc, device=dev)
    kernel = _block_kernel(spec, V, acc, dev, group)
    q_blk, p_blk, w1_blk, w2_blk = (torch.empty(R, V, dtype=acc, device=dev) for _ in range(4))
    for c0 in range(0, N, C):
        c1 = min(c0 + C, N)
        s = s_CV[: c1 - c0]
        h_CH = _take(x.hidden, x.rows, c0, c1)
        _logits_into(s, h_CH, x.weight)
        if x.t_logits is None:
            _logits_into(t_CV[: c1 - c0], _take(x.t_hidden, x.rows, c0, c1), x.t_weight)
        for r0 in range(0, c1 - c0, R):
            r1 = min(r0 + R, c1 - c0)
            n0, n1 = c0 + r0, c0 + r1
            s_RV = s[r0:r1]
            t_RV = t_CV[r0:r1] if x.t_logits is None else t_CV[: r1 - r0]
            guard = _teacher_rows(x, t_RV, c0, r0, r1, spec.inv_temperature)
            # full blocks only: a shorter last block (its size varies from step to step) runs eagerly
            done = (
                kernel(s_RV, t_RV, coef_N[n0:n1], guard=guard, grads=grads)
                if kernel and r1 - r0 == R
                else None
            )
            if done is not None:
                value_N[n0:n1], agree_N[n0:n1] = done
                continue
            q, p, w1, w2 = (b[: r1 - r0] for b in (q_blk, p_blk, w1_blk, w2_blk))
            value_N[n0:n1], agree_N[n0:n1] = _block_work(
                s_RV, t_RV, q, p, w1, w2, coef_N[n0:n1], spec, guard, grads, group
            )
        if grads:
            _accumulate_grads(s, h_CH, x, grad_h_NH, grad_w_VH, c0, c1)
    if not grads:
        all_reduce(value_N, group)  # per-token partial sums over each rank's vocabulary shard
    return value_N, agree_N


# ----------------------------------------------------------------------------------------------------
# The autograd Function
# ----------------------------------------------------------------------------------------------------


class FusedLinearDivergence(torch.autograd.Function):
    """Forward: ``(loss, per_token_T, top1_agree_T)``; only ``loss`` is differentiable, w.r.t.
    ``hidden_TH`` and ``weight_VH``. Prefer :func:`fused_linear_divergence`, which validates inputs.

    ``coef_T`` holds each token's loss weight (mask / normaliser); ``t_*`` are the teacher's inputs
    (hidden states and weight shard, or a logits shard); the teacher gets no gradient. The gradients
    are formed during forward (``spec.grads``) and handed out by backward."""

    @staticmethod
    def forward(ctx, hidden_TH, weight_VH, t_hidden_TH, t_weight_VH, t_logits_TV, coef_T, spec: _Spec, group):
        T, H = hidden_TH.shape
        V_local = weight_VH.shape[0]
        acc, dev = coef_T.dtype, hidden_TH.device
        _, n_valid = vocab_range(V_local, group, spec.vocab_size)
        rows_N = torch.nonzero(coef_T).squeeze(1)  # only tokens that carry loss are computed
        N = rows_N.numel()
        x = _inputs(hidden_TH, weight_VH, t_hidden_TH, t_weight_VH, t_logits_TV, rows_N, n_valid)
        coef_N = coef_T[rows_N]
        need_h = spec.grads and ctx.needs_input_grad[0]
        need_w = spec.grads and ctx.needs_input_grad[1]
        grad_h_NH = torch.zeros(N, H, dtype=acc, device=dev) if need_h else None
        grad_w_VH = torch.zeros(V_local, H, dtype=acc, device=dev) if need_w else None
        value_N, agree_N = _chunks(
            x, spec, group, coef_N, grad_h_NH, None if grad_w_VH is None else grad_w_VH[:n_valid]
        )

        loss = (coef_N * _clip_values(value_N, spec)).sum() * spec.loss_scale
        per_token_T = torch.zeros(T, dtype=acc, device=dev).index_copy_(0, rows_N, value_N)
        agree_T = torch.zeros(T, dtype=torch.bool, device=dev).index_copy_(0, rows_N, agree_N)
        ctx.mark_non_differentiable(per_token_T, agree_T)
        ctx.meta = (T, H, hidden_TH.dtype, weight_VH.dtype)
        # every rank's vocabulary shard contributes to dLoss/dh
        ctx.save_for_backward(all_reduce(grad_h_NH, group) if need_h else None, grad_w_VH, rows_N)
        return loss, per_token_T, agree_T

    @staticmethod
    def backward(ctx, grad_loss, _grad_per_token, _grad_agree):
        T, H, h_dtype, w_dtype = ctx.meta
        # With an upstream gradient of 1 (the usual case) the gradients are handed out as they are:
        # autograd then takes them over as .grad without a copy (it copies instead while the graph is
        # retained, so a second backward stays correct).
        grad_h_NH, grad_w_VH, rows_N = ctx.saved_tensors
        if bool(grad_loss != 1):
            grad_h_NH = None if grad_h_NH is None else grad_h_NH * grad_loss
            grad_w_VH = None if grad_w_VH is None else grad_w_VH * grad_loss
        grad_hidden = grad_weight = None
        if grad_h_NH is not None:
            if grad_h_NH.shape[0] == T:
                grad_hidden = grad_h_NH.to(h_dtype)
            else:
                grad_hidden = grad_h_NH.new_zeros(T, H, dtype=h_dtype).index_copy_(
                    0, rows_N, grad_h_NH.to(h_dtype)
                )
        if grad_w_VH is not None:
            grad_weight = grad_w_VH.to(w_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------
# The friendly entry point
# ----------------------------------------------------------------------------------------------------


def _teacher_inputs(hidden, weight_VH, teacher_hidden_TH, teacher_weight_VH, teacher_logits_TV):
    """Check the student's weight and the teacher's inputs against ``hidden`` ``[T, H]``; returns the
    teacher's ``(hidden [T, H_T], weight [V/tp, H_T], logits [T, V/tp])``, detached, two of them None."""
    T, V_local = hidden.shape[0], weight_VH.shape[0]
    if weight_VH.dim() != 2 or weight_VH.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"student weight {tuple(weight_VH.shape)} does not match hidden size {hidden.shape[1]}"
        )
    if (teacher_logits_TV is None) == (teacher_hidden_TH is None or teacher_weight_VH is None):
        raise ValueError("give the teacher as teacher_hidden_TH + teacher_weight_VH, or as teacher_logits_TV")
    if teacher_logits_TV is not None:
        t_logits = teacher_logits_TV.detach().reshape(-1, teacher_logits_TV.shape[-1])
        if t_logits.shape != (T, V_local):
            raise ValueError(f"teacher logits {tuple(t_logits.shape)} != (tokens, V/tp) = {(T, V_local)}")
        return None, None, t_logits
    t_hidden = teacher_hidden_TH.detach().reshape(-1, teacher_hidden_TH.shape[-1])
    if t_hidden.shape[0] != T or teacher_weight_VH.shape != (V_local, t_hidden.shape[1]):
        raise ValueError(
            f"teacher hidden {tuple(t_hidden.shape)} / weight {tuple(teacher_weight_VH.shape)} do not match "
            f"{T} tokens and a vocabulary shard of {V_local}"
        )
    return t_hidden, teacher_weight_VH.detach(), None


def _loss_weights(hidden, mask_T, normaliser) -> torch.Tensor:
    """``[T]`` loss weights ``mask / normaliser`` in the loss dtype (exact 1/N in float64); a
    normaliser of None is the mask's sum (1 when that is 0)."""
    T = hidden.shape[0]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    weights_T = (
        torch.ones(T, dtype=acc, device=hidden.device) if mask_T is None else mask_T.reshape(-1).to(acc)
    )
    if weights_T.shape[0] != T:
        raise ValueError(f"mask has {weights_T.shape[0]} tokens, hidden states have {T}")
    if normaliser is None:
        total = weights_T.sum()
        normaliser = torch.where(total > 0, total, torch.ones_like(total))
    elif not torch.is_tensor(normaliser) and not normaliser > 0:
        raise ValueError(f"normaliser must be > 0, got {normaliser!r}")
    elif torch.is_tensor(normaliser):
        normaliser = normaliser.to(acc)
    return weights_T / normaliser


def fused_linear_divergence(
    hidden_TH: torch.Tensor,
    weight_VH: torch.Tensor,
    *,
    teacher_hidden_TH: torch.Tensor | None = None,
    teacher_weight_VH: torch.Tensor | None = None,
    teacher_logits_TV: torch.Tensor | None = None,
    mask_T: torch.Tensor | None = None,
    normaliser: float | torch.Tensor | None = None,
    divergence: str = "reverse_kl",
    jsd_beta: float = 0.5,
    skew_alpha: float = 0.1,
    temperature: float = 1.0,
    scale_by_t2: bool = False,
    chunk_size: int | None = None,
    tp_group: dist.ProcessGroup | None = None,
    vocab_size: int | None = None,
    token_clip: float | None = None,
    compile: bool | None = None,
) -> FusedDivergenceOutput:
    r"""Distillation loss of the student's lm-head on its pre-lm-head hidden states, fused and TP-aware.

    .. math:: \mathcal{L} = s \cdot \frac{1}{N} \sum_t w_t\, D\big(\mathrm{softmax}(z^T_t / \tau),
              \mathrm{softmax}(h_t W^\top / \tau)\big),

    with ``D`` the divergence ``divergence`` (see :mod:`opd_megatron.losses.divergences`; teacher first),
    ``w`` the mask, ``N`` the normaliser, ``tau`` the temperature and ``s = tau^2`` if ``scale_by_t2``.

    Args:
        hidden_TH: student hidden states before the output layer, ``[..., H]`` (leading dims are
            flattened into tokens), replicated over the TP group; requires grad.
        weight_VH: this rank's shard of the student output layer, ``[V/tp, H]``.
        teacher_hidden_TH, teacher_weight_VH: the teacher's hidden states ``[..., H_T]`` and output-layer
            shard ``[V/tp, H_T]``; or instead
        teacher_logits_TV: the teacher's logits shard ``[..., V/tp]`` (may hold -inf).
        mask_T: ``[...]`` bool or float per-token weights (0 drops a token); None keeps all.
        normaliser: the divisor ``N``; None uses ``sum(mask)``. For gradient accumulation and data
            parallel pass the step's global token count (see :mod:`opd_megatron.losses.reduce`); for a
            per-sequence mean pass ``reduction_weights(mask, "sequence_mean")`` as ``mask_T`` and 1.
        chunk_size: tokens per chunk; None picks :func:`auto_chunk_size` from ``V/tp``. Results do not
            depend on it; peak memory is one to six ``[chunk, V/tp]`` fp32 buffers (module docstring).
        tp_group: the tensor-parallel group the vocabulary is split over (None: one process).
        vocab_size: the true vocabulary size; rows at global index >= it are padding and excluded.
        token_clip: OPSD's per-token clip ``tau``: each token contributes ``min(D_t, tau)``.
        compile: on one CPU process, run each row block's elementwise work as one ``torch.compile``-d
            function (:mod:`opd_megatron.losses.compiled_block`): about half the eager time at large
            vocabularies, after a compile of seconds per divergence setting and block shape. None
            (default): where it pays (fp32, ``V/tp`` >= 16384), falling back to eager with a warning
            if compiling fails; True: always, compile errors raised; False: never. Ignored on GPU and
            under TP. Results equal the eager path's up to rounding.

    Returns:
        :class:`FusedDivergenceOutput` ``(loss, per_token, top1_agree)``; the per-token tensors have the
        leading shape of ``hidden_TH``.
    """
    check_divergence(divergence, jsd_beta, skew_alpha)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    lead = hidden_TH.shape[:-1]
    hidden = hidden_TH.reshape(-1, hidden_TH.shape[-1])
    t_hidden, teacher_weight_VH, t_logits = _teacher_inputs(
        hidden, weight_VH, teacher_hidden_TH, teacher_weight_VH, teacher_logits_TV
    )
    V_local = weight_VH.shape[0]
    if vocab_size is not None and not 0 < vocab_size <= V_local * tp_size(tp_group):
        raise ValueError(f"vocab_size {vocab_size} is not in (0, {V_local * tp_size(tp_group)}]")
    if token_clip is not None and not token_clip > 0:
        raise ValueError(f"token_clip must be > 0, got {token_clip}")
    coef_T = _loss_weights(hidden, mask_T, normaliser)

    if chunk_size is None:
        chunk_size = auto_chunk_size(V_local)
    elif chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    wants_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight_VH.requires_grad)
    spec = _Spec(
        divergence=divergence,
        jsd_beta=float(jsd_beta),
        skew_alpha=float(skew_alpha),
        inv_temperature=1.0 / temperature,
        loss_scale=temperature**2 if scale_by_t2 else 1.0,
        chunk_size=int(chunk_size),
        vocab_size=vocab_size,
        token_clip=token_clip,
        grads=wants_grad,
        compile=None if compile is None else bool(compile),
    )
    loss, per_token, agree = FusedLinearDivergence.apply(
        hidden, weight_VH, t_hidden, teacher_weight_VH, t_logits, coef_T, spec, tp_group
    )
    return FusedDivergenceOutput(loss, per_token.reshape(lead), agree.reshape(lead))
