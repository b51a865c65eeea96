"""Fixtures of the launch tests."""

from __future__ import annotations

import os
import sys

import pytest


@pytest.fixture(autouse=True)
def _stdin_from_devnull(monkeypatch):
    # nemo-run runs shell commands through invoke, which forwards our stdin to them; under pytest's
    # capture reading stdin raises, so give nemo-run an empty one as a detached CLI run would have.
    with open(os.devnull) as devnull:
        monkeypatch.setattr(sys, "stdin", devnull)
        yield
