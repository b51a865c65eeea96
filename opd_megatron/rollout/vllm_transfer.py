"""GPU refit of a vLLM engine through vLLM's RL weight-transfer API (``vllm.entrypoints.rl``).

**Unverified**: written against the pinned vLLM's trainer-side engines and run by the ``gpu``-marked
tests only; no GPU has run it in this project's CI. On CPU the refit path is the worker's
``reload_weights`` (:mod:`~opd_megatron.rollout.vllm_host`); vLLM's transfer backends are CUDA-only.

One round, after each optimizer step, on the engine rank (TP rank 0 of pipeline stage 0 of each
data-parallel replica; it has already gathered the whole model in HF names onto its GPU and checked
every name and shape against the engine's model):

1. ``start_weight_update`` on the engine (vLLM prepares a layer-wise reload),
2. the tensors cross over: ``nccl`` broadcasts them from the trainer (rank 0 of a two-party NCCL group
   made at the first refit) to the engine's worker while the worker's ``update_weights`` receives them;
   ``ipc`` hands the worker CUDA IPC handles of the trainer's tensors on the same GPU,
3. ``finish_weight_update`` (the worker runs its post-load processing),
4. the prefix cache is reset (as on CPU: cached KV was computed by the old weights).

Which backend (``rollout.vllm_placement``): ``separate`` puts the engine on its own GPU
(``rollout.vllm_devices``), so the transfer is ``nccl``; ``colocated`` shares the trainer's GPU, where
NCCL cannot pair two ranks on one device, so the transfer is ``ipc`` and the engine sleeps (weights
offloaded, KV cache freed) between generating and the next refit.

Imported only by engines that use it (importing vLLM takes seconds).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import torch
from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

__all__ = ["GatheredSource", "HostSyncClient", "WeightTransfer"]


class HostSyncClient:
    """vLLM's ``VLLMWeightSyncClient`` protocol over an engine host's ``call`` (in this process or in the
    helper process that owns the engine): the four control-plane calls of a weight update."""

    def __init__(self, host):
        self.host = host

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self.host.call("transfer_init", init_info)

    def start_weight_update(self) -> None:
        self.host.call("transfer_start")

    def update_weights(self, update_info) -> None:
        self.host.call("transfer_update", update_info)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.host.call("transfer_finish")


class GatheredSource(WeightSource):
    """A re-iterable ``WeightSource`` over the state gathered for this round (set before each send)."""

    def __init__(self):
        self.state: dict[str, torch.Tensor] = {}

    def metadata(self) -> list[ParamMeta]:
        return [ParamMeta(n, t.dtype, tuple(t.shape)) for n, t in self.state.items()]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self.state.items()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WeightTransfer:
    """The trainer side of the engine's weight transfer (engine rank only); built at the first send.

    Args:
        host: the engine host (``call`` / ``close``), started with ``VLLMSettings.weight_transfer``.
        backend: ``nccl`` or ``ipc`` (:func:`~opd_megatron.rollout.vllm_host.transfer_backend`).
        engine_world_size: the engine's own TP x PP size (its workers join the NCCL group after us).
    """

    def __init__(self, host, backend: str, engine_world_size: int = 1):
        if backend not in ("nccl", "ipc"):
            raise ValueError(f"weight-transfer backend {backend!r}: expected 'nccl' or 'ipc'")
        self.host, self.backend, self.engine_world_size = host, backend, engine_world_size
        self.source = GatheredSource()
        self.engine = None

    def _start(self):
        client = HostSyncClient(self.host)
        if self.backend == "nccl":
            from vllm.distributed.weight_transfer.nccl_engine import (
                NCCLTrainerInitInfo,
                NCCLTrainerWeightTransferEngine,
            )

            # The rendezvous is a TCP store this process opens on the loopback interface.
            info = NCCLTrainerInitInfo(
                master_address="127.0.0.1",
                master_port=_free_port(),
                world_size=1 + self.engine_world_size,
                rank=0,
            )
            return NCCLTrainerWeightTransferEngine.trainer_init(info, client=client, source=self.source)
        from vllm.distributed.weight_transfer.ipc_engine import (
            IPCTrainerInitInfo,
            IPCTrainerWeightTransferEngine,
        )

        return IPCTrainerWeightTransferEngine.trainer_init(
            IPCTrainerInitInfo(rank=0), client=client, source=self.source
        )

    def send(self, state: dict[str, torch.Tensor]) -> None:
        """One update round with ``state`` (HF names, checked, on this rank's GPU)."""
        if any(not t.is_cuda for t in state.values()):
            raise ValueError("the GPU weight transfer sends CUDA tensors; this state is on the CPU")
        self.source.state = state
        try:
            if self.engine is None:
                self.engine = self._start()
            self.engine.send_weights()
        finally:
            self.source.state = {}
        self.host.call("reset_prefix_cache")

    def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
