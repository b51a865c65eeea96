"""Shared helpers for the loss tests."""

from __future__ import annotations

import pytest
import torch

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
