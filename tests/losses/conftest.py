"""Shared helpers for the loss tests.

The multi-rank checks of all loss test modules run in one pair of gloo processes (spawning costs more
than the checks): each module keeps its worker at module level, and :func:`tp2` runs them all once.
"""

from __future__ import annotations

import pytest
import torch

from tests.multirank import run_ranks

DIVERGENCE_CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {"jsd_beta": 0.5}),
    ("jsd", {"jsd_beta": 0.1}),
    ("skew_forward_kl", {"skew_alpha": 0.1}),
    ("skew_reverse_kl", {"skew_alpha": 0.3}),
    ("tv", {}),
]


def case_id(case) -> str:
    name, kw = case
    return name + "".join(f"-{k.split('_')[-1]}{v}" for k, v in kw.items())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def init_gloo():
    """The world group of a spawned rank, initialised once per process."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.group.WORLD


def _all_workers(rank: int) -> dict:
    from tests.losses import test_fused_kl, test_reduce, test_topk

    return {
        "reduce": test_reduce.dp_worker(rank),
        "fused": test_fused_kl.tp2_worker(rank),
        "topk": test_topk.topk_tp2_worker(rank),
    }


@pytest.fixture(scope="session")
def tp2() -> list[dict]:
    """Per-rank results of every module's TP/DP worker, from one 2-process gloo run."""
    return run_ranks(_all_workers, world_size=2, timeout=300)
