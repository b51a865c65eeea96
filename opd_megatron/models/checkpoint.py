"""Atomic, reshardable checkpoints on ``megatron.core.dist_checkpointing``.

Layout of one checkpoint (``<root>/step_0000120/``)::

    model/                 dist_checkpointing shards: loadable at any TP/PP
    rank_state/rank_00003.pt   this rank's training state (optimizer, scheduler, RNG, data position)
    config.yaml            the RunConfig that produced the weights
    tokenizer/             the tokenizer, so a checkpoint is self-contained
    meta.json              step, parallel layout, completion marker (written last)

A save writes into ``.tmp_step_XXXXXXX`` and renames it once every rank has finished, so a crash during a
save leaves the previous checkpoints intact and never exposes a half-written one. Only directories with
``meta.json`` count as checkpoints. Rank-state files load with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from opd_megatron.config import RunConfig, from_dict, save_config
from opd_megatron.distributed import ParallelGroups

_STEP_RE = re.compile(r"^step_(\d{7,})$")


class CheckpointError(FileNotFoundError):
    """A checkpoint that is missing, incomplete or incompatible; the message says which and why."""


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_RE.match(d.name)
        if m and (d / "meta.json").is_file():
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint directory or a root holding ``step_*`` directories (latest wins)."""
    p = Path(path)
    if (p / "meta.json").is_file():
        return p
    latest = latest_checkpoint(p)
    if latest is None:
        latest = latest_checkpoint(p / "checkpoints")
    if latest is None:
        if not p.exists():
            raise CheckpointError(f"checkpoint not found: {p} does not exist")
        raise CheckpointError(
            f"no complete checkpoint in {p}: expected a directory with meta.json, or step_* directories "
            "holding one (a save interrupted before completion leaves none)"
        )
    return latest


def read_meta(ckpt: str | Path) -> dict:
    return json.loads((Path(ckpt) / "meta.json").read_text())


def read_config(ckpt: str | Path) -> RunConfig:
    import yaml

    return from_dict(RunConfig, yaml.safe_load((Path(ckpt) / "config.yaml").read_text()))


def save_checkpoint(
    root: str | Path,
    step: int,
    model: torch.nn.Module,
    groups: ParallelGroups,
    *,
    config: RunConfig | None = None,
    tokenizer: Any = None,
    rank_state: dict | None = None,
    keep_last: int = 2,
    extra_models: dict[str, torch.nn.Module] | None = None,
) -> Path:
    """Save a checkpoint collectively (every rank calls this). Returns the final directory."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}"
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # leftover of a crashed save
            shutil.rmtree(tmp)
        (tmp / "model").mkdir(parents=True)
        (tmp / "rank_state").mkdir()
        for name in extra_models or {}:
            (tmp / name).mkdir()
    _barrier()
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp / "model"))
    for name, extra in (extra_models or {}).items():
        dist_checkpointing.save(extra.sharded_state_dict(), str(tmp / name))
    if rank_state is not None:
        part = tmp / "rank_state" / f"rank_{rank:05d}.pt.part"
        torch.save(rank_state, part)
        os.replace(part, part.with_suffix(""))
    _barrier()
    if rank == 0:
        if config is not None:
            save_config(config, tmp / "config.yaml")
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer")
        meta = {
            "step": step,
            "tp": groups.tp_size,
            "pp": groups.pp_size,
            "dp": groups.dp_size,
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "real_vocab_size": getattr(model, "real_vocab_size", None),
            "extra_models": sorted(extra_models or {}),
            "has_rank_state": rank_state is not None,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        if final.exists():  # re-saving a step (e.g. after a resume) replaces it atomically
            old = root / f".old_step_{step:07d}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        for stale in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    return final


def load_model_weights(
    ckpt: str | Path,
    model: torch.nn.Module,
    subdir: str = "model",
    strict: bool = True,
    replicated: bool = False,
) -> None:
    """Load weights saved at any TP/PP into ``model`` built at the current TP/PP.

    ``replicated``: every rank holds its own full copy (a teacher at a smaller TP than the student's);
    the copies all read the same shards, which the access-integrity check would reject as duplicates.
    """
    from megatron.core import dist_checkpointing

    ckpt = resolve_checkpoint(ckpt)
    meta = read_meta(ckpt)
    real_vocab = getattr(model, "real_vocab_size", None)
    if meta.get("real_vocab_size") and real_vocab and meta["real_vocab_size"] != real_vocab:
        raise CheckpointError(
            f"{ckpt}: vocabulary mismatch: checkpoint has {meta['real_vocab_size']} tokens, "
            f"the model was built for {real_vocab}"
        )
    if not (ckpt / subdir).is_dir():
        raise CheckpointError(f"{ckpt}: no '{subdir}' weights in this checkpoint")
    state = dist_checkpointing.load(
        model.sharded_state_dict(), str(ckpt / subdir), validate_access_integrity=not replicated
    )
    model.load_state_dict(state, strict=strict)


def load_rank_state(ckpt: str | Path, groups: ParallelGroups, any_layout: bool = False) -> dict:
    """This rank's training state. Needs the same parallel layout as at save time, unless
    ``any_layout`` (the state holds nothing rank-specific): then rank 0's state when the layout differs."""
    ckpt = resolve_checkpoint(ckpt)
    meta = read_meta(ckpt)
    world = dist.get_world_size() if dist.is_initialized() else 1
    layout = (meta["tp"], meta["pp"], meta["world_size"])
    if layout != (groups.tp_size, groups.pp_size, world) and any_layout:
        return torch.load(ckpt / "rank_state" / "rank_00000.pt", weights_only=True)
    if layout != (groups.tp_size, groups.pp_size, world):
        raise CheckpointError(
            f"{ckpt}: training state was saved at TP={layout[0]} PP={layout[1]} world={layout[2]} and "
            f"cannot resume at TP={groups.tp_size} PP={groups.pp_size} world={world}; weights reshard, "
            "optimizer state does not: start a new run with train.init_checkpoint pointing here"
        )
    rank = dist.get_rank() if dist.is_initialized() else 0
    path = ckpt / "rank_state" / f"rank_{rank:05d}.pt"
    if not path.is_file():
        raise CheckpointError(f"{ckpt}: missing training state {path.name}")
    return torch.load(path, weights_only=True)
