"""Make Megatron-core's CUDA assumptions harmless on a CPU-only machine.

Megatron-core runs forward/backward on CPU with gloo, but a few places assume CUDA exists. This module
patches exactly those, and only when ``torch.cuda.is_available()`` is False, so GPU runs are untouched.
It is idempotent; :func:`opd_megatron.distributed.init_distributed` calls it.

Patched, and why each is safe on CPU:

1. ``torch.cuda.synchronize`` -> no-op. ``dist_checkpointing.save`` synchronises the device before
   writing; on CPU every op is already synchronous, so there is nothing to wait for.
2. ``torch.cuda.current_device`` -> ``torch.device("cpu")``. RoPE and some buffers allocate with
   ``device=torch.cuda.current_device()``; on CPU the right device for those tensors is the CPU. This
   also covers ``YarnRotaryEmbedding.get_emb`` (YaRN RoPE), which moves its CPU-initialised frequencies
   to ``torch.cuda.current_device()`` on first use, construction included: they stay on the CPU.
3. ``megatron.core.pipeline_parallel.schedules.torch`` -> a proxy whose ``zeros(device="cuda")`` gives a
   CPU tensor. The 1F1B schedules allocate their receive buffers with a hard-coded ``device="cuda"``;
   the proxy forwards every other attribute to ``torch`` unchanged, and the patch is scoped to that
   module, so no other code sees a changed ``torch``.
4. The same proxy for ``megatron.core.pipeline_parallel.p2p_communication``, which also allocates
   receive buffers on ``torch.cuda.current_device()`` (covered by 2) and, in some versions, "cuda".
5. ``LanguageModule.setup_embeddings_and_output_layer`` runs with ``Tensor.cuda`` as the identity. With
   tied embeddings and PP > 1 it moves the last stage's copy of the embedding to CUDA before the
   all-reduce that makes both copies equal; on CPU the copy is already where the all-reduce needs it.
   The identity is in force only for the duration of that call.

6. ``megatron.core.transformer.moe.token_dispatcher.torch`` -> the same proxy, whose ``cuda`` gives
   no-op streams and events. The all-to-all token dispatcher (the one that lets expert-parallel ranks
   route different numbers of tokens) copies its split sizes device-to-host on a side CUDA stream and
   waits on an event before the all-to-all; on CPU the split sizes are already host tensors, so there
   is nothing to copy or wait for. Its ``maybe_move_tensor_to_cpu`` also converts the split sizes to
   NumPy only for CUDA tensors, and ``all_to_all_single`` rejects a tensor as split sizes: on CPU the
   dispatcher gets a version that does the NumPy conversion for host tensors too.

8. The proxy of 3 for the optimizer modules (``optimizer.optimizer``, ``distrib_optimizer``,
   ``grad_scaler``, ``clip_grads``) and ``megatron.core.utils`` (its pure-torch fallback of the
   multi-tensor l2 norm): they allocate loss-scale, found-inf and norm scalars with ``device="cuda"``.
   Without apex or Transformer Engine those modules already fall back to pure-torch multi-tensor ops.
9. ``Tensor.type()`` reports CUDA type names (``torch.cuda.BFloat16Tensor``) during the constructors of
   ``Float16OptimizerWithFloat16Params`` and ``DistributedOptimizer`` and during
   ``clip_grad_by_total_norm_fp32``: they decide which parameters need an fp32 main copy by comparing
   ``param.type()`` with CUDA type names and raise on anything else. Only the no-argument form is
   changed, only for CPU tensors, and only for the duration of those calls. Also 5's identity
   ``Tensor.cuda`` during ``DistributedOptimizer.get_parameter_state_dp_zero``, which gathers the
   sharded optimizer state for a reshardable checkpoint and moves it to CUDA for the collective.
10. ``tensor_parallel.random``'s CUDA RNG state get/set: an empty state and a no-op. Activation
   recomputation (``train.recompute``) saves and restores "all RNG states" around each checkpointed
   region; on CPU the only generator is the CPU one, which that code saves and restores itself, so the
   recomputed forward draws the same numbers (dropout included).

One more patch is not about CUDA but about Transformer Engine being absent, so it is applied whenever
TE cannot be imported (CPU, or a GPU machine without TE), by :func:`activate_te_absent_compat`:

7. ``megatron.core.transformer.moe.moe_utils.te_general_gemm`` -> ``None``. The MoE router's gating
   matmul checks ``te_general_gemm is not None`` to choose TE's GEMM or ``torch.mm``, but without TE
   the module never defines the name, so every MoE forward raises ``NameError`` (megatron-core 0.16.1).
   ``None`` selects the ``torch.mm`` branch the code already has.
"""

from __future__ import annotations

import contextlib
import functools
import types

import torch

_ACTIVE = False


class _CpuTorchProxy(types.ModuleType):
    """``torch`` as seen by the pipeline schedules: identical except that CUDA allocations land on CPU."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def _cpu(device):
        if device is None:
            return None
        dev = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
        return torch.device("cpu") if dev.type == "cuda" else dev

    def zeros(self, *args, device=None, **kwargs):
        return torch.zeros(*args, device=self._cpu(device), **kwargs)

    def empty(self, *args, device=None, **kwargs):
        return torch.empty(*args, device=self._cpu(device), **kwargs)

    def tensor(self, *args, device=None, **kwargs):
        return torch.tensor(*args, device=self._cpu(device), **kwargs)


class _HostEvent:
    def synchronize(self) -> None:
        pass


class _HostStream:
    """A CUDA stream stand-in on CPU: work is synchronous, so waiting and recording are no-ops."""

    def wait_stream(self, other) -> None:
        pass

    def record_event(self, event=None) -> _HostEvent:
        return _HostEvent()


class _HostCuda(types.SimpleNamespace):
    """``torch.cuda`` as the MoE token dispatcher sees it on CPU: streams and events are no-ops."""

    Stream = _HostStream

    @staticmethod
    def current_stream(device=None) -> _HostStream:
        return _HostStream()

    @staticmethod
    def stream(stream):
        return contextlib.nullcontext(stream)

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _CpuTorchWithHostStreams(_CpuTorchProxy):
    cuda = _HostCuda()


def _host_tensor(tensor, as_numpy: bool = False, record_stream: bool = False):
    """``maybe_move_tensor_to_cpu`` for tensors that are already on the host."""
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.numpy()
    return tensor


@contextlib.contextmanager
def _tensor_cuda_is_identity():
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def _without_cuda_moves(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _tensor_cuda_is_identity():
            return fn(*args, **kwargs)

    return wrapper


def activate_te_absent_compat() -> None:
    """Patch 7: define the TE name megatron-core's MoE router tests for when TE is not installed."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


@contextlib.contextmanager
def _tensor_type_names_cuda():
    original = torch.Tensor.type

    def cuda_named(self, *args, **kwargs):
        if args or kwargs or self.is_cuda:
            return original(self, *args, **kwargs)
        return original(self).replace("torch.", "torch.cuda.", 1)

    torch.Tensor.type = cuda_named
    try:
        yield
    finally:
        torch.Tensor.type = original


def _with_cuda_type_names(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _tensor_type_names_cuda():
            return fn(*args, **kwargs)

    return wrapper


def _patch_optimizer_modules() -> None:
    from megatron.core import utils as mcore_utils
    from megatron.core.optimizer import clip_grads, distrib_optimizer, grad_scaler
    from megatron.core.optimizer import optimizer as mcore_optimizer

    for module in (mcore_optimizer, distrib_optimizer, grad_scaler, clip_grads, mcore_utils):  # 6
        module.torch = _CpuTorchProxy("torch")
    for cls in (mcore_optimizer.Float16OptimizerWithFloat16Params, distrib_optimizer.DistributedOptimizer):
        cls.__init__ = _with_cuda_type_names(cls.__init__)  # 9
    dopt = distrib_optimizer.DistributedOptimizer
    dopt.get_parameter_state_dp_zero = _without_cuda_moves(dopt.get_parameter_state_dp_zero)
    clip = _with_cuda_type_names(clip_grads.clip_grad_by_total_norm_fp32)
    clip_grads.clip_grad_by_total_norm_fp32 = mcore_optimizer.clip_grad_by_total_norm_fp32 = clip


def _patch_recompute_rng() -> None:
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = lambda *args, **kwargs: torch.empty(0, dtype=torch.uint8)  # 10
    mcore_random._set_cuda_rng_state = lambda *args, **kwargs: None


def activate_cpu_compat() -> bool:
    """Install the CPU patches when CUDA is absent. Returns True when they are active."""
    global _ACTIVE
    activate_te_absent_compat()
    if torch.cuda.is_available():
        return False
    if _ACTIVE:
        return True
    torch.cuda.synchronize = lambda *args, **kwargs: None  # 1
    torch.cuda.current_device = lambda: torch.device("cpu")  # 2
    from megatron.core.pipeline_parallel import p2p_communication, schedules

    schedules.torch = _CpuTorchProxy("torch")  # 3
    p2p_communication.torch = _CpuTorchProxy("torch")  # 4
    from megatron.core.models.common.language_module.language_module import LanguageModule

    LanguageModule.setup_embeddings_and_output_layer = _without_cuda_moves(  # 5
        LanguageModule.setup_embeddings_and_output_layer
    )
    from megatron.core.transformer.moe import token_dispatcher

    token_dispatcher.torch = _CpuTorchWithHostStreams("torch")  # 6
    token_dispatcher.maybe_move_tensor_to_cpu = _host_tensor
    _patch_optimizer_modules()  # 8, 9
    _patch_recompute_rng()  # 10
    _ACTIVE = True
    return True


def cpu_compat_active() -> bool:
    return _ACTIVE
