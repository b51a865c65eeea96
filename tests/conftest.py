"""Suite-wide test selection.

``slurm`` tests bring up a real one-node SLURM cluster (``tools/slurm_local.py``): they need root, and run
only where asked for, with ``OPD_RUN_SLURM=1`` or in CI (``CI`` set), because they install Debian packages
when missing and start system daemons. ``gpu`` tests are skipped without CUDA.
"""

from __future__ import annotations

import os

import pytest


def _slurm_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "slurm tests start slurmctld/slurmd/munged and need root"
    if os.environ.get("OPD_RUN_SLURM") != "1" and not os.environ.get("CI"):
        return "slurm tests run in CI or with OPD_RUN_SLURM=1 (they install packages and start daemons)"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _slurm_skip_reason()
    import torch

    no_cuda = None if torch.cuda.is_available() else "needs CUDA (gpu marker)"
    for item in items:
        if reason is not None and "slurm" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))
        if no_cuda is not None and "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=no_cuda))


@pytest.fixture(autouse=True)
def _restore_signal_mask():
    """Child processes inherit the signal mask: a test that leaves stop signals blocked in the test
    process must not change what later tests' subprocesses start with."""
    import signal

    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    yield
    signal.pthread_sigmask(signal.SIG_SETMASK, before)
