"""Run identity: what a checkpoint must share with the run that resumes from it.

A checkpoint records the job kind (``sft``, ``opd``, ...) and the values of the config fields that define
what its weights and optimizer state *are*: the architecture (a different shape cannot load), the
tokenizer (the same ids would mean other text) and, for distillation, the objective (resuming an OPD run
under another loss silently trains a different model). Learning rate, step count, data paths and the
like may change between a run and its resumption; they are not part of the identity.

The identity is stored with its field values, so a mismatch names each changed field and both values,
and with a SHA-256 of them (``hash``), so two identities compare in one step. The field list grows
(head size, QK norm, RoPE scaling, mixture of experts, template variables were added later): a
checkpoint whose identity lacks a field compares it as its ``config.yaml`` recorded it, else as the
field's default, so checkpoints written before stay loadable.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from opd_megatron.config import RunConfig

_ARCHITECTURE = (
    "model.num_layers",
    "model.hidden_size",
    "model.num_attention_heads",
    "model.num_query_groups",
    "model.head_dim",
    "model.qk_layernorm",
    "model.ffn_hidden_size",
    "model.vocab_size",
    "model.make_vocab_size_divisible_by",
    "model.max_sequence_length",
    "model.rotary_base",
    "model.rope_scaling",
    "model.rope_scaling_factor",
    "model.rope_low_freq_factor",
    "model.rope_high_freq_factor",
    "model.rope_original_max_position",
    "model.tie_embeddings",
    "model.add_qkv_bias",
    "model.norm_epsilon",
    "model.num_experts",
    "model.moe_router_topk",
    "model.moe_norm_topk_prob",
    "model.moe_ffn_hidden_size",
)
_TOKENIZER = ("tokenizer.kind", "tokenizer.path", "tokenizer.chat_template", "tokenizer.template_kwargs")
_OBJECTIVE = ("loss.objective", "loss.divergence")

IDENTITY_FIELDS: dict[str, tuple[str, ...]] = {
    "sft": _ARCHITECTURE + _TOKENIZER,
    "opd": _ARCHITECTURE + _TOKENIZER + _OBJECTIVE,
    "mopd": _ARCHITECTURE + _TOKENIZER + _OBJECTIVE,
}
"""Config field paths that must not change across a resume, per job kind (others: all of them)."""

_ALL_FIELDS = _ARCHITECTURE + _TOKENIZER + _OBJECTIVE


def _value(config: Any, path: str) -> Any:
    node = config
    for part in path.split("."):
        node = getattr(node, part)
    return node


def identity_hash(job: str, fields: dict[str, Any]) -> str:
    """SHA-256 of the job kind and the field values, in a canonical JSON form."""
    text = json.dumps({"job": job, "fields": fields}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def run_identity(config: Any, job: str) -> dict:
    """``{"job", "fields": {path: value}, "hash"}`` of ``config`` (a RunConfig) for a ``job`` kind."""
    fields = {path: _value(config, path) for path in IDENTITY_FIELDS.get(job, _ALL_FIELDS)}
    return {"job": job, "fields": fields, "hash": identity_hash(job, fields)}


def _saved_value(path: str, saved_config: dict | None) -> Any:
    """A field an older identity did not record: its value in the checkpoint's saved config (a mapping)
    when that has it, else the field's default."""
    node: Any = saved_config
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return _value(RunConfig(), path)
        node = node[part]
    return node


def identity_changes(saved: dict, current: dict, saved_config: dict | None = None) -> list[str]:
    """What differs between a saved identity and the current one, as ``"path: old -> new"`` strings
    (empty: the same run). A field the saved identity lacks (the list grew since it was written) compares
    as its value in ``saved_config`` (the checkpoint's ``config.yaml``), else as the field's default; a
    field only the saved identity has (since dropped from the list) is skipped."""
    if saved.get("hash") == current.get("hash"):
        return []
    changes = []
    if saved.get("job") != current.get("job"):
        changes.append(f"job: {saved.get('job')} -> {current.get('job')}")
    old, new = dict(saved.get("fields") or {}), current.get("fields") or {}
    for path in new:
        if path not in old:
            old[path] = _saved_value(path, saved_config)
    for path in sorted(set(old) & set(new)):
        if old[path] != new[path]:
            changes.append(f"{path}: {old[path]!r} -> {new[path]!r}")
    return changes


__all__ = ["IDENTITY_FIELDS", "identity_changes", "identity_hash", "run_identity"]
