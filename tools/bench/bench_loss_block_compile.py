"""One row block of the fused loss's elementwise work, eager (what the loss runs) vs ``torch.compile``.

    OMP_NUM_THREADS=1 python tools/bench/bench_loss_block_compile.py [--rows 8] [--vocab 32768]

The block is JSD(0.5) at temperature 1, one rank: both softmaxes (max, exp, sums, log-probs), the
top-1 agreement, the value, ``g = dD/dl_S`` and ``ds = coef (g - q sum g)``. ``eager`` is the loss's
own code path (``_normalise``, ``pointwise``, ``_student_grad_into``, in place in work buffers);
``compiled`` is the same formula written as one function and compiled by Inductor (CPU C++ codegen).
Both run interleaved in one process on the same inputs; reported: CPU ns per vocabulary entry (best
of the repeats) and the error of the value and of ``ds`` against the same formula in float64 (max abs
error / max |ds| for the gradient).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

BETA = 0.5


def block(s_RV, t_RV, coef_R):
    """The reference formula (also the compiled function)."""
    s0 = s_RV - s_RV.amax(-1, keepdim=True)
    t0 = t_RV - t_RV.amax(-1, keepdim=True)
    agree_R = (s0 + t0).amax(-1) == 0
    es, et = torch.exp(s0), torch.exp(t0)
    zs, zt = es.sum(-1, keepdim=True), et.sum(-1, keepdim=True)
    ls, lt = s0 - torch.log(zs), t0 - torch.log(zt)
    q, p = es / zs, et / zt
    log_m = torch.log(torch.clamp_min(torch.lerp(q, p, BETA), torch.finfo(s_RV.dtype).tiny))
    qd = (ls - log_m) * q
    value_R = BETA * ((lt - log_m) * p).sum(-1) + (1 - BETA) * qd.sum(-1)
    g = (1 - BETA) * qd
    return value_R, agree_R, coef_R[:, None] * (g - q * g.sum(-1, keepdim=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from opd_megatron.losses.fused_kl import _normalise, _student_grad_into
    from opd_megatron.losses.pointwise import pointwise

    torch.manual_seed(0)
    R, V = args.rows, args.vocab
    s, t, coef = torch.randn(R, V) * 3, torch.randn(R, V) * 3, torch.ones(R)
    work = [torch.empty(R, V) for _ in range(4)]

    def eager(s_RV, t_RV, coef_R):
        s_, t_ = s_RV.clone(), t_RV.clone()  # the loss works in place on its own buffers
        q, p, w1, w2 = work
        agree = _normalise(s_, q, t_, p, None, 1.0)
        value, g = pointwise("jsd", t_, s_, p, q, w1, w2, jsd_beta=BETA, value=True, grad=True)
        _student_grad_into(s_, g, q, coef_R, None)
        return value, agree, s_

    t0 = time.perf_counter()
    compiled = torch.compile(block, dynamic=False, fullgraph=True)
    compiled(s, t, coef)
    print(f"compile: {time.perf_counter() - t0:.1f} s")
    v64, _, d64 = block(s.double(), t.double(), coef.double())
    for name, fn in (("eager", eager), ("compiled", compiled)):
        v, _, d = fn(s, t, coef)
        print(
            f"{name}: value error {float((v - v64).abs().max()):.2e}, "
            f"gradient error {float((d - d64).abs().max() / d64.abs().max()):.2e}"
        )
    best = {"eager": float("inf"), "compiled": float("inf"), "input copy": float("inf")}
    fns = {"eager": eager, "compiled": compiled, "input copy": lambda a, b, c: (a.clone(), b.clone())}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            c0 = time.process_time()
            for _ in range(args.iters):
                fn(s, t, coef)
            best[name] = min(best[name], (time.process_time() - c0) / args.iters / (R * V) * 1e9)
    for name, ns in best.items():
        print(f"{name}: {ns:.2f} ns per entry")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    main()
