"""The parts of the GPU refit path that run without a GPU: which backend a placement gets, the
placement's errors, and the adapters between the engine host and vLLM's trainer-side transfer engines."""

from __future__ import annotations

import pytest
import torch

from opd_megatron.config import ConfigError, RolloutConfig
from opd_megatron.rollout.vllm_host import transfer_backend, vllm_import_error
from tests.multirank import run_ranks

_SKIP = vllm_import_error()


def test_backend_per_placement():
    assert transfer_backend("colocated", cuda=False) is None  # CPU: the worker's reload_weights
    assert transfer_backend("separate", cuda=False) is None
    assert transfer_backend("colocated", cuda=True) == "ipc"  # NCCL cannot pair two ranks on one GPU
    assert transfer_backend("separate", cuda=True) == "nccl"


def test_separate_placement_needs_devices():
    with pytest.raises(ConfigError, match="vllm_devices"):
        RolloutConfig(engine="vllm", vllm_placement="separate")
    with pytest.raises(ConfigError, match="vllm_devices"):
        RolloutConfig(engine="vllm", vllm_placement="separate", vllm_devices=[-1])
    assert RolloutConfig(engine="vllm", vllm_placement="separate", vllm_devices=[4]).vllm_devices == [4]


def _separate_on_cpu(rank):
    from opd_megatron.config import ModelConfig, ParallelConfig
    from opd_megatron.distributed import init_distributed
    from opd_megatron.models.gpt import build_gpt_model
    from opd_megatron.rollout.vllm_engine import EngineStartError, VLLMEngine

    groups = init_distributed(ParallelConfig())
    cfg = ModelConfig(num_layers=1, hidden_size=64, num_attention_heads=2, max_sequence_length=32)
    model = build_gpt_model(cfg, groups, 40, seed=0)
    try:
        VLLMEngine(
            model, cfg, groups, eos_id=2, pad_id=0, kv_cache_bytes=1 << 20, placement="separate", devices=[1]
        )
    except EngineStartError as e:
        return str(e)
    return "started"


def test_separate_placement_on_cpu_stops_before_starting_an_engine():
    msg = run_ranks(_separate_on_cpu, 1, timeout=120)[0]
    assert "rollout.vllm_placement=separate" in msg and "no GPU" in msg


class _RecordingHost:
    """The far side of the host interface: records the calls the adapters make."""

    def __init__(self):
        self.calls = []

    def call(self, method, *args):
        self.calls.append((method, args))


@pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")
def test_sync_client_drives_the_engine_host_calls():
    from opd_megatron.rollout.vllm_transfer import HostSyncClient

    host = _RecordingHost()
    client = HostSyncClient(host)
    client.init_weight_transfer_engine({"packed": False})
    client.start_weight_update()
    client.update_weights({"names": ["a"]})
    client.finish_weight_update("v1")
    assert host.calls == [
        ("transfer_init", ({"packed": False},)),
        ("transfer_start", ()),
        ("transfer_update", ({"names": ["a"]},)),
        ("transfer_finish", ()),
    ]


@pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")
def test_gathered_source_declares_what_it_yields_and_is_reiterable():
    from opd_megatron.rollout.vllm_transfer import GatheredSource

    src = GatheredSource()
    src.state = {
        "model.embed_tokens.weight": torch.ones(5, 4),
        "lm_head.weight": torch.zeros(5, 4, dtype=torch.bfloat16),
    }
    meta = src.metadata()
    assert [(m.name, m.dtype, m.shape) for m in meta] == [
        ("model.embed_tokens.weight", torch.float32, (5, 4)),
        ("lm_head.weight", torch.bfloat16, (5, 4)),
    ]
    assert [n for n, _ in src] == [n for n, _ in src] == [m.name for m in meta]
    # vLLM's own grouping and order check accept it.
    assert [names for names, _ in src.iter_groups()] == src.groups()


@pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")
def test_transfer_refuses_cpu_tensors_and_unknown_backends():
    from opd_megatron.rollout.vllm_transfer import WeightTransfer

    with pytest.raises(ValueError, match="'gloo'"):
        WeightTransfer(_RecordingHost(), "gloo")
    host = _RecordingHost()
    with pytest.raises(ValueError, match="CUDA tensors"):
        WeightTransfer(host, "nccl").send({"w": torch.ones(2)})
    assert host.calls == []  # nothing reached the engine
