"""Atomic, reshardable checkpoints on ``megatron.core.dist_checkpointing``.

Layout of one checkpoint (``<root>/step_0000120/``)::

    model/                 dist_checkpointing shards: loadable at any TP/PP
    rank_state/rank_00003.pt   this rank's training state (optimizer, scheduler, RNG, data position)
    config.yaml            the RunConfig that produced the weights
    tokenizer/             the tokenizer, so a checkpoint is self-contained
    meta.json              step, parallel layout, job kind and run identity
    manifest.json          size and SHA-256 of every other file (written last)

A save writes into ``.tmp_step_XXXXXXX`` and renames it once every rank has finished, so a crash during a
save leaves the previous checkpoints intact and never exposes a half-written one. Only directories with
``meta.json`` count as checkpoints. Rank-state files load with ``weights_only=True``.

Integrity: a checkpoint that was damaged after its save (bytes overwritten, a file truncated, emptied or
deleted, an unparsable ``meta.json``) fails :func:`verify_checkpoint`, which names each file and what is
wrong with it. :func:`find_resume_checkpoint` reports damaged checkpoints and falls back to the newest
intact one; pruning (``keep_last``) counts intact checkpoints only and never deletes one newer than the
checkpoint just saved, so the last good checkpoint survives until a newer one has been written and checked.
Checkpoints saved before manifests existed (no ``format`` in their meta) get structural checks only.

Run identity: :func:`check_run_identity` compares the job kind and the config fields recorded at save
time (:mod:`opd_megatron.models.run_identity`) with the current run's and raises a one-line
:class:`CheckpointError` naming every changed field, unless forced.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from opd_megatron.config import RunConfig, from_dict, save_config
from opd_megatron.distributed import ParallelGroups
from opd_megatron.models.manifest import MANIFEST_NAME, verify_manifest, write_manifest
from opd_megatron.models.run_identity import identity_changes, run_identity

_STEP_RE = re.compile(r"^step_(\d{7,})$")

CHECKPOINT_FORMAT = 2
"""``meta.json``'s ``format``: 2 has a manifest and may have a run identity; older ones have neither."""


class CheckpointError(FileNotFoundError):
    """A checkpoint that is missing, incomplete, damaged or incompatible; the message says which and why."""


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _in_process_write_results():
    """Keep Megatron's checkpoint writer from starting a ``multiprocessing`` Manager process.

    Its ``torch_dist`` writer hands the write results back through a queue that it creates on first use
    from a *spawned* Manager: a ~300 MB helper that lives as long as the trainer, and that, after a
    ``kill -9`` of the trainer, lives on as an orphan (holding the trainer's blocked signal mask). A
    synchronous save puts and gets the results in this very process, so a plain in-process queue serves,
    and the Manager is never started. Async saves (not used here) would still need Megatron's own."""
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async as writer
    except ImportError:  # another Megatron layout: nothing to replace
        yield
        return
    if getattr(writer, "_results_queue", "absent") is not None:  # unknown layout, or already created
        yield
        return
    writer._results_queue = queue.Queue()
    try:
        yield
    finally:
        writer._results_queue = None


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
    """The newest complete checkpoint under ``root``, unverified (see :func:`find_resume_checkpoint`)."""
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Every ``step_*`` directory, oldest first: with the rename protocol each one was complete once,
    so one without ``meta.json`` is damaged, not in progress."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), d) for d in root.iterdir() if (m := _STEP_RE.match(d.name)) and d.is_dir()]
    return sorted(found)


def verify_checkpoint(ckpt: str | Path, *, checksums: bool = True) -> list[str]:
    """What is wrong with checkpoint ``ckpt``, one string per problem naming the file (empty: intact).

    Checks ``meta.json`` (present, a JSON object with a step), then every file against the manifest
    (size, and with ``checksums`` the SHA-256). Checkpoints older than the manifest get structural checks:
    the weights' metadata and every rank's training state present and not empty."""
    ckpt = Path(ckpt)
    meta_path = ckpt / "meta.json"
    if not meta_path.is_file():
        return ["meta.json: missing"]
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        return [f"meta.json: unparsable ({type(e).__name__}: {str(e)[:120]})"]
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        return ["meta.json: not a checkpoint's meta (expected an object with an integer 'step')"]
    fmt = meta.get("format")
    # A manifest, once written, is the reference; a meta that says one was written needs it.
    if (ckpt / MANIFEST_NAME).exists() or (isinstance(fmt, int) and fmt >= 2):
        return verify_manifest(ckpt, checksums=checksums)
    problems = []
    extras = meta.get("extra_models") if isinstance(meta.get("extra_models"), list) else []
    for sub in ["model", *map(str, extras)]:
        if not (ckpt / sub / ".metadata").is_file():
            problems.append(f"{sub}/.metadata: missing")
    if meta.get("has_rank_state"):
        world = meta.get("world_size") if isinstance(meta.get("world_size"), int) else 1
        for rank in range(world):
            path = ckpt / "rank_state" / f"rank_{rank:05d}.pt"
            if not path.is_file():
                problems.append(f"{path.relative_to(ckpt)}: missing")
            elif path.stat().st_size == 0:
                problems.append(f"{path.relative_to(ckpt)}: empty")
    return problems


def _newest_intact(root: Path, checksums: bool, report: Callable[[str], None]) -> Path | None:
    """Newest checkpoint under ``root`` that verifies; reports each damaged one passed over. ``None``
    when there is no checkpoint at all; :class:`CheckpointError` when there are some but none intact."""
    damaged = []
    for _, ckpt in reversed(_step_dirs(root)):
        problems = verify_checkpoint(ckpt, checksums=checksums)
        if not problems:
            if damaged:
                report(f"resuming from {ckpt.name}, the newest intact checkpoint")
            return ckpt
        damaged.append(f"{ckpt.name} ({'; '.join(problems)})")
        report(f"checkpoint {ckpt} is damaged and will not be used: {'; '.join(problems)}")
    if damaged:
        raise CheckpointError(f"no intact checkpoint in {root}: {', '.join(damaged)}")
    return None


def _decided_once(decide: Callable[[], Path | None], group: Any, what: str) -> Path | None:
    """``decide()`` on the group's first rank only (it may read every byte of a checkpoint), its answer
    (a path, None, or the :class:`CheckpointError` it raised) broadcast to the others: every rank gets
    the same one."""
    distributed = dist.is_available() and dist.is_initialized()
    first = dist.get_global_rank(group, 0) if distributed and group is not None else 0
    answer: list[Any] = [None]
    if not distributed or dist.get_rank() == first:
        try:
            found = decide()
            answer[0] = str(found) if found is not None else None
        except Exception as e:  # every rank must learn of it, or the others wait in the broadcast
            answer[0] = (
                e if isinstance(e, CheckpointError) else CheckpointError(f"{what}: {type(e).__name__}: {e}")
            )
    if distributed:
        dist.broadcast_object_list(answer, src=first, group=group)
    if isinstance(answer[0], CheckpointError):
        raise answer[0]
    return Path(answer[0]) if answer[0] is not None else None


def find_resume_checkpoint(
    root: str | Path,
    *,
    group: Any = None,
    checksums: bool = True,
    report: Callable[[str], None] = _stderr,
) -> Path | None:
    """The checkpoint to resume from: the newest under ``root`` that passes :func:`verify_checkpoint`.

    Damaged newer ones are reported (``report``, one line each, naming the files) and skipped. Returns
    ``None`` when ``root`` holds no checkpoint; raises :class:`CheckpointError` when it holds some but none
    is intact. Collective over ``group`` when torch.distributed is initialised: the group's first rank
    verifies (reading every byte once) and broadcasts its answer, so all ranks resume from the same one."""
    root = Path(root)
    return _decided_once(
        lambda: _newest_intact(root, checksums, report), group, f"cannot look for checkpoints in {root}"
    )


def resolve_checkpoint(path: str | Path, *, checksums: bool = False) -> Path:
    """Accept a checkpoint directory or a root holding ``step_*`` directories (the newest intact one wins).
    Sizes are checked; with ``checksums`` also every file's SHA-256 against the manifest (the checkpoint is
    read once). A damaged checkpoint named directly is a :class:`CheckpointError` naming the files."""
    p = Path(path)
    if (p / "meta.json").is_file() or (p / MANIFEST_NAME).is_file():
        problems = verify_checkpoint(p, checksums=checksums)
        if problems:
            raise CheckpointError(f"checkpoint {p} is damaged: {'; '.join(problems)}")
        return p
    latest = _newest_intact(p, checksums, _stderr)
    if latest is None:
        latest = _newest_intact(p / "checkpoints", checksums, _stderr)
    if latest is None:
        if not p.exists():
            raise CheckpointError(f"checkpoint not found: {p} does not exist")
        raise CheckpointError(
            f"no complete checkpoint in {p}: expected a directory with meta.json, or step_* directories "
            "holding one (a save interrupted before completion leaves none)"
        )
    return latest


def verified_checkpoint(path: str | Path, *, checksums: bool = True, group: Any = None) -> Path:
    """:func:`resolve_checkpoint` of a checkpoint about to be loaded as a teacher or as initial weights,
    with ``checksums`` (``train.verify_checksums``) read once: collective over ``group`` when
    torch.distributed is initialised (its first rank verifies and broadcasts the answer)."""
    found = _decided_once(
        lambda: resolve_checkpoint(path, checksums=checksums), group, f"cannot verify checkpoint {path}"
    )
    assert found is not None  # resolve_checkpoint returns a path or raises
    return found


def read_meta(ckpt: str | Path) -> dict:
    path = Path(ckpt) / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unparsable ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    return meta


def check_run_identity(
    ckpt: str | Path,
    config: RunConfig,
    job: str,
    *,
    force: bool = False,
    report: Callable[[str], None] = _stderr,
) -> list[str]:
    """Raise a one-line :class:`CheckpointError` if ``ckpt`` was written by a different run: another job
    kind, or another architecture, tokenizer or objective (:mod:`~opd_megatron.models.run_identity`).

    With ``force`` the changes are reported and returned instead. A checkpoint saved without an identity
    (older format, or saved without ``job``) has nothing to compare: ``[]``."""
    saved = read_meta(ckpt).get("identity")
    if not isinstance(saved, dict):
        return []
    changes = identity_changes(saved, run_identity(config, job), _saved_config(ckpt))
    if changes and not force:
        raise CheckpointError(
            f"checkpoint {ckpt} was written by a different run ({'; '.join(changes)}); resume it only on "
            "purpose (train.resume: force) or use another train.output_dir"
        )
    if changes:
        report(f"resuming {ckpt} although the run changed (forced): {'; '.join(changes)}")
    return changes


def _saved_config(ckpt: str | Path) -> dict | None:
    """The checkpoint's ``config.yaml`` as a plain mapping (None when missing or unreadable)."""
    import yaml

    try:
        data = yaml.safe_load((Path(ckpt) / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


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
    job: str | None = None,
) -> Path:
    """Save a checkpoint collectively (every rank calls this). Returns the final directory.

    ``job`` (``"sft"``, ``"opd"``, ...) with ``config`` records the run identity that
    :func:`check_run_identity` compares on resume. The manifest is written last, then the directory is
    renamed into place; older checkpoints are pruned by :func:`prune_checkpoints`."""
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
    with _in_process_write_results():
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
            "format": CHECKPOINT_FORMAT,
        }
        if job is not None and config is not None:
            meta["identity"] = run_identity(config, job)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        write_manifest(tmp)  # last: it covers every file above
        if final.exists():  # re-saving a step (e.g. after a resume) replaces it atomically
            old = root / f".old_step_{step:07d}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        prune_checkpoints(root, keep_last, final)
    _barrier()
    return final


def prune_checkpoints(root: str | Path, keep_last: int, newest: str | Path) -> list[Path]:
    """Delete old checkpoints after ``newest`` was saved; returns what was deleted.

    Nothing is deleted unless ``newest`` verifies (sizes; its checksums were just computed from the
    files). Then ``newest`` and the ``keep_last - 1`` newest *intact* checkpoints before it are kept, and
    older or damaged ones before it go. Checkpoints of later steps (an earlier, longer run) are never
    touched. ``keep_last <= 0`` keeps everything."""
    root, newest = Path(root), Path(newest)
    if keep_last <= 0 or verify_checkpoint(newest, checksums=False):
        return []
    newest_step = int(_STEP_RE.match(newest.name).group(1))
    kept, deleted = 1, []
    for step, ckpt in reversed(_step_dirs(root)):
        if step >= newest_step:
            continue
        if kept < keep_last and not verify_checkpoint(ckpt, checksums=False):
            kept += 1
            continue
        shutil.rmtree(ckpt, ignore_errors=True)
        deleted.append(ckpt)
    return deleted


def _root_cause(e: BaseException) -> str:
    """``Type: first line`` of the error behind ``e`` (the first failed rank's, for a checkpoint failure)."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        e = inner[0] if isinstance(inner, tuple) else inner
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300]}" if lines else type(e).__name__


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
    from torch.distributed.checkpoint.api import CheckpointException

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
    try:
        state = dist_checkpointing.load(
            model.sharded_state_dict(), str(ckpt / subdir), validate_access_integrity=not replicated
        )
        model.load_state_dict(state, strict=strict)
    # A shape mismatch, a damaged shard: name the checkpoint, not megatron's internals. torch's
    # CheckpointException is a BaseException carrying each rank's real error.
    except (Exception, CheckpointException) as e:
        raise CheckpointError(
            f"{ckpt}/{subdir}: the weights cannot be loaded into the model built from the current config "
            f"({_root_cause(e)}); compare model.* with {ckpt / 'config.yaml'}"
        ) from e


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
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # empty, truncated or foreign file
        raise CheckpointError(
            f"{path}: unreadable training state ({type(e).__name__}: {str(e)[:200]})"
        ) from e
