"""A teacher scored by an in-process vLLM engine (``teachers[i].placement: vllm``).

The engine loads the teacher's Hugging Face model directory and answers what a remote vLLM server
answers, without HTTP: for every token of ``prompt + completion`` its ``prompt_logprobs`` top-k
(temperature 1, raw logits). The loss takes the sparse top-k path, exactly as for a remote teacher:
:class:`VLLMScorer` has the :class:`~opd_megatron.teachers.remote.RemoteTeacherClient` method
``score_topk`` that :class:`~opd_megatron.teachers.remote.RemoteTeacher` calls, so the slicing of
completion positions and the TP broadcast are that class's.

Use it for a teacher that does not fit the trainer's layout (another TP size, another architecture
vLLM knows) but should still sit on the trainer's machines. The engine lives only on the rank that
scores (TP rank 0 of the last pipeline stage); a start failure stops every rank of the model with the
same one-line message.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from opd_megatron.distributed import ParallelGroups
from opd_megatron.rollout.vllm_host import EngineStartError, VLLMSettings, start_engine_host
from opd_megatron.teachers.base import TeacherError
from opd_megatron.teachers.remote import PromptTopK, RemoteTeacher

__all__ = ["VLLMScorer", "build_vllm_teacher"]


class VLLMScorer:
    """Top-k prompt log-probs of an HF model directory from a vLLM engine (``score_topk`` as the remote
    client's). ``max_sequence_length`` caps the engine's context (default: the model's)."""

    def __init__(
        self,
        hf_dir: str | Path,
        name: str,
        *,
        kv_cache_bytes: int,
        max_sequence_length: int | None = None,
        max_logprobs: int = 20,
        max_num_seqs: int = 64,
        seed: int = 0,
        in_process: bool | None = None,
        setting_prefix: str = "teachers.vllm_",
    ):
        hf_dir = Path(hf_dir)
        config_path = hf_dir / "config.json"
        if not config_path.is_file():
            raise EngineStartError(
                f"teacher {name!r}: {hf_dir} has no config.json (a Hugging Face model directory)"
            )
        hf = json.loads(config_path.read_text())
        limit = int(hf.get("max_position_embeddings") or max_sequence_length or 0)
        self.max_sequence_length = min(limit, max_sequence_length) if max_sequence_length else limit
        self.vocab_size = int(hf["vocab_size"])
        self.name, self.max_logprobs = name, max_logprobs
        dtype = str(hf.get("dtype") or hf.get("torch_dtype") or "float32").removeprefix("torch.")
        settings = VLLMSettings(
            kv_cache_bytes=int(kv_cache_bytes),
            max_sequence_length=self.max_sequence_length,
            max_num_seqs=max_num_seqs,
            dtype=dtype,
            seed=seed,
            max_logprobs=max_logprobs,
            setting_prefix=setting_prefix,
        )
        self.host = start_engine_host(str(hf_dir), settings, in_process)

    def _check(self, seqs: list[list[int]], k: int) -> None:
        if not 1 <= k <= self.max_logprobs:
            raise ValueError(
                f"teacher {self.name!r}: k must be in [1, {self.max_logprobs}] (max_logprobs), got {k}"
            )
        for i, s in enumerate(seqs):
            if not 1 < len(s) <= self.max_sequence_length:
                raise ValueError(
                    f"teacher {self.name!r}: sequence {i} has {len(s)} tokens; allowed: 2 to "
                    f"{self.max_sequence_length} (the engine's max_sequence_length)"
                )
            bad = next((t for t in s if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise ValueError(
                    f"teacher {self.name!r}: sequence {i}: token id {bad} is outside the vocabulary "
                    f"[0, {self.vocab_size})"
                )

    def score_topk(self, seqs: list[list[int]], k: int) -> list[PromptTopK]:
        """Per sequence of ``L`` tokens, ``L - 1`` rows (row ``j`` scores token ``j + 1``)."""
        seqs = [list(map(int, s)) for s in seqs]
        self._check(seqs, k)
        if not seqs:
            return []
        try:
            rows = self.host.call("prompt_topk", seqs, k)
        except Exception as e:
            raise TeacherError(f"teacher {self.name!r} (vLLM): scoring failed: {e}") from e
        return [
            PromptTopK(
                torch.tensor(ids, dtype=torch.long).reshape(-1, k),
                torch.tensor(values, dtype=torch.float32).reshape(-1, k),
                torch.tensor(token_lp, dtype=torch.float32),
            )
            for ids, values, token_lp in rows
        ]

    def close(self) -> None:
        """Stop the engine (at the end of a run: see ``rollout.vllm_host``) and remove its temp dir."""
        self.host.close()
        shutil.rmtree(self.host.workdir, ignore_errors=True)


def _share_from_last_stage(obj, groups: ParallelGroups):
    """TP rank 0 of the last stage's ``obj`` on every rank of the replica's TP x PP group."""
    box = [obj]
    if groups.is_last_stage and groups.tp_size > 1:
        dist.broadcast_object_list(box, src=dist.get_global_rank(groups.tp_group, 0), group=groups.tp_group)
    if groups.pp_size > 1:
        src = dist.get_global_rank(groups.pp_group, groups.pp_size - 1)
        dist.broadcast_object_list(box, src=src, group=groups.pp_group)
    return box[0]


class _NotScoring:
    """Stands in for the scorer on ranks that never call it (RemoteTeacher only reads ``name``)."""

    def __init__(self, name: str):
        self.name = name

    def score_topk(self, seqs, k):
        raise AssertionError("only TP rank 0 of the last pipeline stage scores")

    def close(self) -> None:
        pass


def build_vllm_teacher(
    hf_dir: str | Path,
    name: str,
    k: int,
    groups: ParallelGroups | None,
    *,
    kv_cache_bytes: int,
    max_sequence_length: int | None = None,
    setting_prefix: str = "teachers.vllm_",
    in_process: bool | None = None,
) -> RemoteTeacher:
    """A :class:`RemoteTeacher` whose scorer is an in-process vLLM engine on the scoring rank
    (collective over the model's TP x PP group when ``groups`` is given)."""
    scoring = groups is None or (groups.is_last_stage and groups.tp_rank == 0)
    scorer, error = None, None
    if scoring:
        try:
            scorer = VLLMScorer(
                hf_dir,
                name,
                kv_cache_bytes=kv_cache_bytes,
                max_sequence_length=max_sequence_length,
                max_logprobs=max(k, 20),
                setting_prefix=setting_prefix,
                in_process=in_process,
            )
        except EngineStartError as e:
            error = str(e)
    if groups is not None:
        error = _share_from_last_stage(error, groups)
    if error is not None:
        raise EngineStartError(error)
    return RemoteTeacher(scorer if scorer is not None else _NotScoring(name), k, groups)
