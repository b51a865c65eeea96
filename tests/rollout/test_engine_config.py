"""Configuration of the rollout engine and of vLLM teachers: defaults, and each bad value named by its
full field path."""

from __future__ import annotations

import pytest

from opd_megatron.config import ConfigError, RunConfig, from_dict


def test_defaults_keep_the_megatron_sampler():
    cfg = RunConfig()
    assert cfg.rollout.engine == "megatron"
    assert cfg.rollout.tis == "auto" and cfg.rollout.tis_cap == 2.0


@pytest.mark.parametrize(
    ("rollout", "message"),
    [
        ({"engine": "sglang"}, r"rollout\.engine: got 'sglang'; allowed: 'megatron', 'vllm'"),
        ({"vllm_kv_cache_mb": 0}, r"rollout\.vllm_kv_cache_mb: must be > 0, got 0"),
        ({"vllm_max_num_seqs": 0}, r"rollout\.vllm_max_num_seqs: must be >= 1, got 0"),
        ({"vllm_placement": "remote"}, r"rollout\.vllm_placement: got 'remote'"),
        ({"tis": "yes"}, r"rollout\.tis: got 'yes'; allowed: 'auto', 'on', 'off'"),
        ({"tis_cap": 0.5}, r"rollout\.tis_cap: must be >= 1, got 0.5"),
    ],
)
def test_bad_rollout_engine_settings(rollout, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(RunConfig, {"rollout": rollout})


def test_vllm_teacher_needs_an_hf_directory():
    with pytest.raises(ConfigError, match=r"teachers\[0\]\.checkpoint: teacher 'big' runs on vLLM"):
        from_dict(RunConfig, {"teachers": [{"name": "big", "placement": "vllm"}]})
    with pytest.raises(ConfigError, match=r"teachers\[0\]\.vllm_kv_cache_mb: must be > 0"):
        from_dict(
            RunConfig,
            {"teachers": [{"name": "big", "placement": "vllm", "checkpoint": "d", "vllm_kv_cache_mb": -1}]},
        )
    cfg = from_dict(RunConfig, {"teachers": [{"name": "big", "placement": "vllm", "checkpoint": "hf/big"}]})
    assert cfg.teachers[0].placement == "vllm"
