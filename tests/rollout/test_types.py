"""SamplingParams validation and the Rollout -> training batch layout (hand-checked)."""

from __future__ import annotations

import pytest
import torch

from opd_megatron.config import RolloutConfig
from opd_megatron.rollout.types import Rollout, SamplingParams

PAD = 0


def _rollout(weights: bool = False) -> Rollout:
    return Rollout(
        prompt_ids=[[5, 6, 7], [4]],
        completion_ids=[[8, 9, 2], [3, 3]],
        logprobs=[[-0.1, -0.2, -0.3], [-0.5, -0.6]],
        finish_reason=["eos", "length"],
        importance_weights=[[1.0, 0.5, 2.0], [0.25, 4.0]] if weights else None,
    )


def test_to_batch_alignment_hand_checked():
    batch = _rollout().to_batch(PAD)
    #        t:          0  1  2  3  4  5
    assert batch["tokens"].tolist() == [[5, 6, 7, 8, 9, 2], [4, 3, 3, PAD, PAD, PAD]]
    assert batch["labels"].tolist() == [[6, 7, 8, 9, 2, PAD], [3, 3, PAD, PAD, PAD, PAD]]
    # Position t carries loss iff labels[t] is a completion token: t = 2, 3, 4 (predicting 8, 9, EOS)
    # for the first sample, t = 0, 1 for the second.
    assert batch["loss_mask"].tolist() == [[0, 0, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]]
    torch.testing.assert_close(
        batch["behaviour_logprobs"],
        torch.tensor([[0, 0, -0.1, -0.2, -0.3, 0], [-0.5, -0.6, 0, 0, 0, 0]]),
    )
    assert batch["lengths"].tolist() == [6, 3]
    assert batch["tokens"].dtype == batch["labels"].dtype == torch.long
    assert "importance_weights" not in batch


def test_to_batch_width_and_weights():
    batch = _rollout(weights=True).to_batch(PAD, width=8)
    assert batch["tokens"].shape == (2, 8)
    torch.testing.assert_close(
        batch["importance_weights"],
        torch.tensor([[1, 1, 1.0, 0.5, 2.0, 1, 1, 1], [0.25, 4.0, 1, 1, 1, 1, 1, 1]]),
    )
    with pytest.raises(ValueError, match="width 5 is shorter"):
        _rollout().to_batch(PAD, width=5)


def test_rollout_rejects_inconsistent_fields():
    with pytest.raises(ValueError, match="3 completion tokens but 2 log-probs"):
        Rollout([[1]], [[1, 2, 3]], [[0.0, 0.0]], ["length"])
    with pytest.raises(ValueError, match="unknown finish reasons"):
        Rollout([[1]], [[1]], [[0.0]], ["done"])
    with pytest.raises(ValueError, match="needs at least one sample"):
        Rollout([], [], [], []).to_batch(PAD)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"stop": "ab"}, "list of strings"),
        ({"stop": [""]}, "non-empty"),
    ],
)
def test_sampling_params_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_sampling_params_from_config():
    cfg = RolloutConfig(max_new_tokens=7, temperature=0.5, top_p=0.9, top_k=4, stop=["\n"])
    p = SamplingParams.from_config(cfg, seed=3)
    assert (p.max_new_tokens, p.temperature, p.top_p, p.top_k, p.stop, p.seed) == (7, 0.5, 0.9, 4, ["\n"], 3)
    assert p.filtered and not p.greedy
    assert SamplingParams(temperature=0).greedy
