"""vLLM as the student's rollout engine, refitted with the trainer's weights after every optimizer step.

:class:`VLLMEngine` implements the :class:`~opd_megatron.rollout.types.Sampler` interface of the Megatron
KV-cache sampler: the same call, the same :class:`~opd_megatron.rollout.types.Rollout` back on every
rank of the model's TP x PP group. One engine per data-parallel replica lives on its *engine rank* (TP
rank 0 of pipeline stage 0; :mod:`~opd_megatron.rollout.vllm_host` says in which process), built from
the student's HF-format description (:func:`~opd_megatron.models.hf_convert.hf_config_from_model_config`)
with placeholder weights, then loaded in memory with the trainer's weights gathered from every TP shard
and PP stage (:func:`~opd_megatron.rollout.hf_gather.gather_hf_state`).

Refit (:meth:`VLLMEngine.refit`, after each optimizer step): gather again, check every tensor's name and
shape against what the engine's model expects (a mismatch is a :class:`RefitError` naming the tensor,
raised before anything is copied: never a partial load), copy them in place through the worker's
``reload_weights`` with an in-memory iterator, then reset the prefix cache (its KV was computed with the
old weights; without the reset a prompt sharing a cached prefix continues from stale keys and values).

Behaviour log-probs are vLLM's "processed" log-probs: ``log_softmax(logits / T)`` after top-k / top-p,
renormalised over the survivors; for greedy requests the plain ``log_softmax(logits)``; exactly the
:class:`Rollout` definition. The trainer recomputes its own (see :mod:`~opd_megatron.rollout.mismatch`).

Sampling noise differs from the Megatron sampler's (vLLM seeds one generator per request; request ``i``
gets a seed mixed from ``params.seed`` and ``i``), so sampled completions are equal in distribution,
not token for token; greedy completions are equal token for token in fp32.

Stop strings: the tokenizer is not loaded into vLLM (token-id prompts; the built-in character tokenizer
has no HF files), so a completion is cut after the token whose decoded text first contains a stop
string (the Megatron sampler's rule) once generation is done; the tokens after it are dropped.

On GPU (unverified: no GPU has run it here) the refit goes through vLLM's RL weight-transfer API instead
of ``reload_weights`` (:mod:`~opd_megatron.rollout.vllm_transfer`): NCCL to an engine on its own GPU
(``placement="separate"``), CUDA IPC to an engine sharing the trainer's GPU (``colocated``), which sleeps
between generating and the next refit. Those backends are CUDA-only; on CPU the worker's
``reload_weights`` is the refit path.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from opd_megatron.config import ModelConfig
from opd_megatron.distributed import ParallelGroups
from opd_megatron.models.hf_convert import hf_config_from_model_config, hf_tensor_shapes
from opd_megatron.rollout.hf_gather import gather_hf_state, is_engine_rank
from opd_megatron.rollout.sampler import seed_for_rank
from opd_megatron.rollout.types import Rollout, SamplingParams, check_generate_request
from opd_megatron.rollout.vllm_host import (
    EngineStartError,
    RefitError,
    VLLMSettings,
    start_engine_host,
    transfer_backend,
)

__all__ = ["EngineStartError", "RefitError", "RefitStats", "VLLMEngine", "check_state"]

_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass
class RefitStats:
    """What one refit cost; the same on every rank of the replica (log it every step)."""

    seconds: float
    """Wall time of the whole refit (gather + load + prefix-cache reset)."""
    gather_seconds: float
    """Collecting TP shards and PP stages onto the engine rank."""
    load_seconds: float
    """Copying into the engine (and resetting its prefix cache)."""
    weight_bytes: int
    """Bytes of the weights loaded into the engine (the HF tensors; the CPU GEMM kernels may keep
    pre-packed copies besides, which ``host_rss_bytes`` includes)."""
    kv_cache_bytes: int
    host_rss_bytes: int
    """Resident memory of the process hosting the engine."""

    def metrics(self, prefix: str = "rollout/refit_") -> dict[str, float]:
        return {
            f"{prefix}seconds": self.seconds,
            f"{prefix}gather_seconds": self.gather_seconds,
            f"{prefix}load_seconds": self.load_seconds,
            f"{prefix}engine_weight_mb": self.weight_bytes / 2**20,
            f"{prefix}engine_kv_cache_mb": self.kv_cache_bytes / 2**20,
            f"{prefix}engine_rss_mb": self.host_rss_bytes / 2**20,
        }


def check_state(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> None:
    """Raise :class:`RefitError` naming the first tensor whose name or shape the engine does not expect,
    or the first expected tensor that is missing; checks everything before anything is loaded."""
    for name, t in state.items():
        if name not in expected:
            raise RefitError(f"refit: tensor {name!r} is not a parameter of the engine's model")
        if tuple(t.shape) != tuple(expected[name]):
            raise RefitError(
                f"refit: tensor {name!r} has shape {list(t.shape)}, the engine's model expects "
                f"{list(expected[name])}"
            )
        if not t.is_floating_point():
            raise RefitError(f"refit: tensor {name!r} has dtype {t.dtype}, expected a floating-point tensor")
    missing = [n for n in expected if n not in state]
    if missing:
        raise RefitError(f"refit: tensor {missing[0]!r} is missing ({len(missing)} missing in all)")


def _share(obj, groups: ParallelGroups):
    """Give every rank of the replica's TP x PP group the engine rank's ``obj`` (pickled; small)."""
    box = [obj]
    if groups.pp_rank == 0 and groups.tp_size > 1:
        dist.broadcast_object_list(box, src=dist.get_global_rank(groups.tp_group, 0), group=groups.tp_group)
    if groups.pp_size > 1:
        dist.broadcast_object_list(box, src=dist.get_global_rank(groups.pp_group, 0), group=groups.pp_group)
    return box[0]


class VLLMEngine:
    """Samples completions with a vLLM engine holding a copy of the student (see the module docstring).

    Collective: every rank of the model's TP x PP group constructs it, calls :meth:`generate` and
    :meth:`refit` with the same arguments, and gets the same results.

    Args:
        model: this rank's GPTModel stage (its current weights are loaded into the engine).
        cfg: the model's :class:`ModelConfig` (names and shapes of the HF tensors).
        groups: the process groups the model was built with.
        eos_id / pad_id / tokenizer / stop_ids: as for :class:`~opd_megatron.rollout.sampler.MegatronSampler`.
        kv_cache_bytes: the engine's KV-cache memory (``rollout.vllm_kv_cache_mb``).
        max_batch_size: most sequences the engine decodes together.
        max_sequence_length: longest prompt + completion; defaults to the model's.
        seed: the engine's own seed (sampling noise of requests without a seed).
        block_size: KV-cache block size in tokens (prefix caching reuses whole blocks); vLLM's default
            when ``None``.
        in_process: where the engine runs (see :func:`~opd_megatron.rollout.vllm_host.start_engine_host`).
        placement: ``colocated`` (the engine shares this rank's device) or ``separate`` (GPU only: the
            engine of data-parallel replica ``r`` runs on physical GPU ``devices[r]``).
        devices: for ``separate``, one GPU per data-parallel replica.
    """

    def __init__(
        self,
        model,
        cfg: ModelConfig,
        groups: ParallelGroups,
        *,
        eos_id: int,
        pad_id: int,
        kv_cache_bytes: int,
        tokenizer=None,
        stop_ids: Sequence[int] = (),
        max_batch_size: int = 64,
        max_sequence_length: int | None = None,
        seed: int = 0,
        block_size: int | None = None,
        in_process: bool | None = None,
        setting_prefix: str = "rollout.vllm_",
        placement: str = "colocated",
        devices: list[int] | None = None,
    ):
        self.cfg, self.groups = cfg, groups
        cuda = groups.device.type == "cuda"
        if placement == "separate" and not cuda:
            raise EngineStartError(
                f"{setting_prefix}placement=separate puts the engine on GPUs of its own; this run has "
                "no GPU (use colocated: the engine runs on rank 0 of each data-parallel replica)"
            )
        device = None
        if placement == "separate":
            devices = list(devices or [])
            if len(devices) < groups.dp_size:
                raise EngineStartError(
                    f"{setting_prefix}devices={devices} names {len(devices)} GPU(s); placement=separate "
                    f"needs one per data-parallel replica ({groups.dp_size})"
                )
            device = devices[groups.dp_rank]
        self.backend = transfer_backend(placement, cuda)
        self.transfer = None
        self.asleep = False
        self.eos_id, self.pad_id, self.tokenizer = eos_id, pad_id, tokenizer
        self.end_ids = tuple(dict.fromkeys([eos_id, *stop_ids]))
        self.vocab_size = model.real_vocab_size
        self.max_sequence_length = max_sequence_length or model.max_sequence_length
        for name, tok in (*(("eos_id", e) for e in self.end_ids), ("pad_id", pad_id)):
            if not 0 <= tok < self.vocab_size:
                raise ValueError(f"{name}={tok} is outside the model's vocabulary [0, {self.vocab_size})")
        self.dtype = next(model.parameters()).dtype
        self.expected = hf_tensor_shapes(cfg, self.vocab_size)
        self.host = None
        settings = VLLMSettings(
            kv_cache_bytes=int(kv_cache_bytes),
            max_sequence_length=self.max_sequence_length,
            max_num_seqs=max_batch_size,
            dtype=_DTYPES[self.dtype],
            seed=seed,
            block_size=block_size,
            setting_prefix=setting_prefix,
            weight_transfer=self.backend,
            sleep_mode=self.backend == "ipc",
            cuda_device=device,
        )
        t0 = time.perf_counter()
        error = None
        if is_engine_rank(groups):
            arch = "Qwen2ForCausalLM" if cfg.add_qkv_bias else "LlamaForCausalLM"
            hf_cfg = hf_config_from_model_config(cfg, self.vocab_size, arch, self.dtype)
            hf_cfg["max_position_embeddings"] = max(self.max_sequence_length, cfg.max_sequence_length)
            try:
                self.host = start_engine_host(hf_cfg, settings, in_process)
            except EngineStartError as e:
                error = str(e)
        # Every rank stops with the same message, before any training step.
        error = _share(error, groups)
        if error is not None:
            raise EngineStartError(error)
        self.start_seconds = time.perf_counter() - t0
        self.last_refit = self.refit(model)

    # ------------------------------------------------------------------ weights
    def load_state(self, state: dict[str, torch.Tensor], *, reset_prefix_cache: bool = True) -> float:
        """Engine rank only: check ``state`` (HF names) against the engine's model, then copy it in;
        returns seconds. ``reset_prefix_cache=False`` exists only to show why the reset is needed."""
        if self.host is None:
            raise RuntimeError("load_state runs on the engine rank (TP rank 0 of pipeline stage 0)")
        check_state(state, self.expected)
        self._wake()
        if self.backend is None:
            return self.host.call("load", state, reset_prefix_cache)
        t0 = time.perf_counter()
        if self.transfer is None:
            from opd_megatron.rollout.vllm_transfer import WeightTransfer

            self.transfer = WeightTransfer(self.host, self.backend)
        self.transfer.send(state)  # resets the prefix cache
        return time.perf_counter() - t0

    def _wake(self) -> None:
        if self.asleep:
            self.host.call("wake_up")
            self.asleep = False

    def _sleep(self) -> None:
        """A colocated GPU engine gives the trainer its memory back until the next refit or generate."""
        if self.backend == "ipc" and not self.asleep:
            self.host.call("sleep")
            self.asleep = True

    def refit(self, model, groups: ParallelGroups | None = None) -> RefitStats:
        """Stream ``model``'s current weights into the engine (collective; see the module docstring)."""
        groups = groups or self.groups
        t0 = time.perf_counter()
        state = gather_hf_state(model, self.cfg, groups, self.dtype)
        t1 = time.perf_counter()
        answer: object = None
        if state is not None:
            try:
                load_s = self.load_state(state)
                mem = self.host.call("memory")
                mem["weight_bytes"] = sum(t.numel() * t.element_size() for t in state.values())
                answer = (load_s, mem)
            except RefitError as e:
                answer = e
            del state
        answer = _share(answer, groups)
        if isinstance(answer, RefitError):
            raise RefitError(str(answer))
        load_s, mem = answer
        stats = RefitStats(
            seconds=time.perf_counter() - t0,
            gather_seconds=t1 - t0,
            load_seconds=load_s,
            weight_bytes=mem["weight_bytes"],
            kv_cache_bytes=mem["kv_cache_bytes"],
            host_rss_bytes=mem["host_rss_bytes"],
        )
        self.last_refit = stats
        return stats

    # ------------------------------------------------------------------ generation
    def _check_request(self, prompts, params: SamplingParams) -> None:
        check_generate_request(
            prompts, params, self.vocab_size, self.max_sequence_length, self.tokenizer is not None, "engine"
        )

    def _request(self, params: SamplingParams) -> dict:
        return {
            "n": 1,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k,
            "logprobs": 0,  # the sampled token's log-prob only
            "stop_token_ids": list(self.end_ids),
            "detokenize": False,
        }

    def _seeds(self, n: int, params: SamplingParams) -> list[int | None]:
        if params.greedy or params.seed is None:
            return [None] * n
        return [seed_for_rank(params.seed, i) % (1 << 62) for i in range(n)]

    def _cut_at_stop(self, ids: list[int], stops: list[str]) -> int | None:
        """Length up to and including the token whose decoded text first contains a stop string."""
        for t in range(1, len(ids) + 1):
            text = self.tokenizer.decode(ids[:t])
            if any(s in text for s in stops):
                return t
        return None

    def generate(self, prompts: list[list[int]], params: SamplingParams, mix_with=None) -> Rollout:
        """One completion per prompt (collective over the replica's TP x PP group). Teacher-mixed
        sampling (``mix_with``, MiniLLM) needs the teacher's logits at every step: Megatron sampler only."""
        if mix_with is not None:
            raise NotImplementedError(
                "rollout.engine=vllm cannot sample from a teacher mixture (loss.mix_alpha > 0); use "
                "rollout.engine=megatron"
            )
        self._check_request(prompts, params)
        answer = None
        if self.host is not None:
            self._wake()
            outs = self.host.call(
                "generate",
                [list(map(int, p)) for p in prompts],
                self._request(params),
                self._seeds(len(prompts), params),
            )
            self._sleep()
            completions, logprobs, reasons = [], [], []
            for ids, lps, finish, stop_reason in outs:
                reason = "eos" if (finish == "stop" and stop_reason in self.end_ids) else "length"
                if params.stop:
                    cut = self._cut_at_stop(ids, params.stop)
                    if cut is not None and (reason != "eos" or cut < len(ids)):
                        ids, lps, reason = ids[:cut], lps[:cut], "stop"
                completions.append(ids)
                logprobs.append(lps)
                reasons.append(reason)
            answer = Rollout(
                prompt_ids=[list(p) for p in prompts],
                completion_ids=completions,
                logprobs=logprobs,
                finish_reason=reasons,
            )
        return _share(answer, self.groups)

    def close(self) -> None:
        """Stop the engine and remove its temporary directory. At the end of a run only: an in-process
        engine's shutdown also ends this process's ``torch.distributed`` (see ``vllm_host``)."""
        if self.host is not None:
            if self.transfer is not None:
                self.transfer.close()
                self.transfer = None
            self.host.close()
            shutil.rmtree(self.host.workdir, ignore_errors=True)
            self.host = None
