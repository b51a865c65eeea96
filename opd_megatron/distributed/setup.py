"""Process-group setup: torch.distributed and Megatron's parallel_state.

This package is the only place that touches Megatron's parallel_state globals. Everything else receives
a :class:`ParallelGroups` (and, for Megatron modules, the ``ProcessGroupCollection`` inside it).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from opd_megatron.config import ConfigError, ParallelConfig
from opd_megatron.distributed.cpu_compat import activate_cpu_compat


@dataclass
class ParallelGroups:
    """Handles to the process groups of one rank, passed explicitly to library code."""

    tp_group: dist.ProcessGroup
    pp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    device: torch.device
    pg_collection: object  # megatron.core.process_groups_config.ProcessGroupCollection
    embd_group: dist.ProcessGroup | None = None
    """First and last pipeline stage of this TP/DP slice: where tied embeddings live twice."""
    ep_group: dist.ProcessGroup | None = None
    """Expert-parallel group (mixture-of-experts models): ranks that hold different experts of a layer."""
    ep_rank: int = 0
    ep_size: int = 1
    expert_dp_rank: int = 0
    """Rank among the replicas of this rank's experts (data parallelism left over after EP)."""
    expert_dp_group: dist.ProcessGroup | None = None
    """The replicas of this rank's experts: expert gradients are summed over this group, not
    ``dp_group`` (whose other members hold other experts when EP > 1)."""

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def global_rank(self) -> int:
        return dist.get_rank()

    @property
    def tp_group_or_none(self) -> dist.ProcessGroup | None:
        """The TP group for library calls that take ``None`` for "one rank" (skips no-op collectives)."""
        return self.tp_group if self.tp_size > 1 else None

    @property
    def is_main(self) -> bool:
        return dist.get_rank() == 0


def init_distributed(parallel: ParallelConfig, seed: int = 1234) -> ParallelGroups:
    """Initialise torch.distributed (from torchrun's env, or a single local process) and Megatron's
    model-parallel groups. Safe to call again in the same process with the same sizes."""
    cuda = torch.cuda.is_available()
    activate_cpu_compat()
    backend = parallel.backend if parallel.backend != "auto" else ("nccl" if cuda else "gloo")
    if backend == "nccl" and not cuda:
        raise ConfigError("parallel.backend", "nccl needs CUDA; use gloo (or auto) on a CPU machine")
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=parallel.timeout_s)
        if "RANK" not in os.environ:  # single process without torchrun
            # Nothing goes into the environment: a process this one starts (a CLI run, a helper) must
            # not mistake itself for a rank of this world.
            if cuda:
                torch.cuda.set_device(0)
            # An in-memory store: a TCP rendezvous would pick a free port and bind it later, and another
            # process can take the port in between (EADDRINUSE on a busy machine).
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            if cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend=backend, timeout=timeout)
    world = dist.get_world_size()
    tp, pp, ep = parallel.tp, parallel.pp, parallel.expert_model_parallel_size
    if world % (tp * pp) != 0:
        raise ConfigError(
            "parallel",
            f"world size {world} is not divisible by TP*PP = {tp}*{pp}; launch a multiple of {tp * pp} processes",
        )
    if (world // (tp * pp)) % ep != 0:
        raise ConfigError(
            "parallel.expert_model_parallel_size",
            f"EP={ep} must divide the data-parallel size {world // (tp * pp)} (world {world} / TP {tp} / PP {pp})",
        )

    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.process_groups_config import ProcessGroupCollection

    if ps.model_parallel_is_initialized() and (
        ps.get_tensor_model_parallel_world_size() != tp
        or ps.get_pipeline_model_parallel_world_size() != pp
        or ps.get_expert_model_parallel_world_size() != ep
    ):
        ps.destroy_model_parallel()
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep
        )
    # Megatron's RNG tracker gives TP ranks different dropout/init streams where they must differ.
    if cuda:
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)

    pgs = ProcessGroupCollection.use_mpu_process_groups()
    return ParallelGroups(
        tp_group=ps.get_tensor_model_parallel_group(),
        pp_group=ps.get_pipeline_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=tp,
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_size=pp,
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        device=torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu"),
        pg_collection=pgs,
        embd_group=ps.get_embedding_group(check_initialized=False) if pp > 1 else None,
        ep_group=ps.get_expert_model_parallel_group(),
        ep_rank=ps.get_expert_model_parallel_rank(),
        ep_size=ep,
        expert_dp_rank=ps.get_expert_data_parallel_rank(),
        expert_dp_group=ps.get_expert_data_parallel_group(),
    )


def destroy_distributed() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


_SUBGROUPS: dict[tuple[int, int], list] = {}


def tensor_subgroups(groups: ParallelGroups, sub_tp: int) -> ParallelGroups:
    """The same layout with a smaller tensor-parallel size ``sub_tp`` (dividing the current one): each TP
    group splits into consecutive sub-groups, and a model built with the result is replicated
    ``tp / sub_tp`` times inside the original TP group. Used for a teacher at a smaller TP than its
    student. Every rank must call this (creating process groups is collective)."""
    import copy

    if sub_tp == groups.tp_size:
        return groups
    if sub_tp < 1 or groups.tp_size % sub_tp:
        raise ConfigError(
            "teachers.tensor_model_parallel_size",
            f"a teacher TP of {sub_tp} must divide the student's TP of {groups.tp_size}",
        )
    key = (groups.tp_size, sub_tp)
    if key not in _SUBGROUPS:
        subgroups = []
        world = dist.get_world_size()
        for tp_start in range(0, world, groups.tp_size):  # Megatron's TP groups are consecutive ranks
            for s in range(tp_start, tp_start + groups.tp_size, sub_tp):
                ranks = list(range(s, s + sub_tp))
                subgroups.append((ranks, dist.new_group(ranks)))
        _SUBGROUPS[key] = subgroups
    me = dist.get_rank()
    ranks, group = next((r, g) for r, g in _SUBGROUPS[key] if me in r)
    pgs = copy.copy(groups.pg_collection)
    for name in ("tp", "tp_cp"):
        setattr(pgs, name, group)
    sub = copy.copy(groups)
    sub.tp_group, sub.tp_size, sub.tp_rank, sub.pg_collection = group, sub_tp, ranks.index(me), pgs
    return sub
