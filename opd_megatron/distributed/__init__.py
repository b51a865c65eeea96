"""Process groups and CPU compatibility. The only package that reads Megatron's parallel_state."""

from opd_megatron.distributed.cpu_compat import activate_cpu_compat, cpu_compat_active
from opd_megatron.distributed.setup import (
    ParallelGroups,
    destroy_distributed,
    init_distributed,
    tensor_subgroups,
)

__all__ = [
    "ParallelGroups",
    "activate_cpu_compat",
    "cpu_compat_active",
    "destroy_distributed",
    "init_distributed",
    "tensor_subgroups",
]
