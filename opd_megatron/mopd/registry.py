"""The teachers of a run, built from config and checked before the first step.

Every misconfiguration found here names the teacher (``teachers[i]`` path and name): two teachers
claiming one domain under exclusive specialty routing, a default teacher that does not exist, a remote
teacher that does not answer ``/health`` at start-up, a vocabulary (or a saved tokenizer) that differs
from the student's without a ``tokenizer`` for cross-tokeniser scoring, a teacher kind the routing cannot
use (mixing needs the student's vocabulary, dense, on every teacher).
"""

from __future__ import annotations

import os

from opd_megatron.config import ConfigError, RunConfig, TeacherConfig, TokenizerConfig, validate_teachers
from opd_megatron.data.render import PromptRenderer
from opd_megatron.distributed import ParallelGroups
from opd_megatron.models.checkpoint import CheckpointError, read_config, read_meta, verified_checkpoint
from opd_megatron.teachers.base import Teacher, TeacherError
from opd_megatron.teachers.colocated import build_colocated_teacher
from opd_megatron.teachers.cross import CrossTokenizerTeacher
from opd_megatron.teachers.remote import RemoteTeacher, RemoteTeacherClient
from opd_megatron.tokenization import load_tokenizer
from opd_megatron.tokenization.base import Tokenizer, TokenizerError
from opd_megatron.tokenization.jinja_template import template_for


def default_teacher(cfg: RunConfig) -> str:
    return cfg.mopd.default_teacher or cfg.teachers[0].name


def validate_mopd_config(cfg: RunConfig) -> None:
    """The static checks of the teacher set (:func:`~opd_megatron.config.validate_teachers`), and the
    environment variables holding the services' tokens."""
    validate_teachers(cfg)
    for i, t in enumerate(cfg.teachers):
        if t.token_env and t.placement == "remote" and t.token_env not in os.environ:
            raise ConfigError(
                f"teachers[{i}].token_env",
                f"teacher {t.name!r}: environment variable {t.token_env} is not set",
            )


def _same_vocabulary(a: Tokenizer, b: Tokenizer) -> bool:
    ids = list(range(a.vocab_size))
    return a.vocab_size == b.vocab_size and a.token_bytes(ids) == b.token_bytes(ids)


def _remote(where: str, tcfg: TeacherConfig, cfg: RunConfig, groups: ParallelGroups, vocab: int) -> Teacher:
    token = os.environ.get(tcfg.token_env) if tcfg.token_env else None
    client = RemoteTeacherClient(
        tcfg.url, tcfg.name, token, timeout_s=tcfg.timeout_s, retries=tcfg.retries, vocab_size=vocab
    )
    # Only the rank that talks to the service checks it (see RemoteTeacher).
    if groups.is_last_stage and groups.tp_rank == 0 and not client.health():
        raise ConfigError(
            f"{where}.url", f"teacher {tcfg.name!r}: no answer from {tcfg.url}/health at start-up"
        )
    return RemoteTeacher(client, cfg.loss.topk, groups)


def _vllm(where: str, tcfg: TeacherConfig, cfg: RunConfig, groups: ParallelGroups) -> Teacher:
    """An in-process vLLM engine scores the top-k (the sparse path)."""
    from opd_megatron.rollout.vllm_host import EngineStartError
    from opd_megatron.teachers.vllm_teacher import build_vllm_teacher

    try:
        return build_vllm_teacher(
            tcfg.checkpoint, tcfg.name, cfg.loss.topk, groups,
            kv_cache_bytes=int(tcfg.vllm_kv_cache_mb * 2**20),
            max_sequence_length=cfg.model.max_sequence_length, setting_prefix=f"{where}.vllm_",
        )  # fmt: skip
    except EngineStartError as e:
        raise ConfigError(where, f"teacher {tcfg.name!r}: {e}") from e


def _check_colocated_vocabulary(where, tcfg, ckpt, vocab: int, teacher_tok, student_tok) -> None:
    """The checkpoint's vocabulary against the tokenizer the teacher is scored with. real_vocab_size is
    the tokenizer's size; the embedding may hold more rows (Qwen: 151,936 rows for 151,665 tokens). Rows
    beyond the tokenizer are not built, so only the tokenizer has to match: teacher and student of one
    family pair up whatever their row counts."""
    ckpt_vocab = read_meta(ckpt).get("real_vocab_size")
    rows = read_config(ckpt).model.vocab_size if (ckpt / "config.yaml").is_file() else None
    rows_note = f" (embedding rows: {rows})" if rows not in (None, ckpt_vocab) else ""
    if teacher_tok is not None:
        if ckpt_vocab not in (None, vocab):
            raise ConfigError(
                f"{where}.tokenizer",
                f"teacher {tcfg.name!r}: its tokenizer has {vocab} tokens but its checkpoint {ckpt_vocab}"
                f"{rows_note}",
            )
        return
    if ckpt_vocab not in (None, vocab):
        raise ConfigError(
            f"{where}.tokenizer",
            f"teacher {tcfg.name!r}: its checkpoint has a vocabulary of {ckpt_vocab} tokens{rows_note}, "
            f"the student {vocab}; give the teacher's tokenizer to score it cross-tokeniser",
        )
    # A checkpoint without a saved tokenizer: the size check above is all there is. One converted from an
    # HF directory keeps the directory's tokenizer.json under hf/.
    saved = load_tokenizer(ckpt) if (ckpt / "tokenizer").is_dir() else None
    hf_tok = ckpt / "hf" / "tokenizer.json"
    if saved is None and hf_tok.is_file():
        saved = load_tokenizer(TokenizerConfig(kind="hf", path=str(hf_tok)))
    if saved is not None and not _same_vocabulary(saved, student_tok):
        raise ConfigError(
            f"{where}.tokenizer",
            f"teacher {tcfg.name!r}: the tokenizer saved with its checkpoint spells its tokens differently "
            "from the student's; give the teacher's tokenizer to score it cross-tokeniser",
        )


def build_teacher(
    i: int, tcfg: TeacherConfig, cfg: RunConfig, groups: ParallelGroups, student_tok: Tokenizer
) -> Teacher:
    """One teacher of ``cfg.teachers[i]`` (``placement`` colocated, remote or vllm), wrapped for
    cross-tokeniser scoring when it has its own ``tokenizer`` (its prompts then rendered from the row with
    its own chat template)."""
    where = f"teachers[{i}]"
    try:
        teacher_tok = load_tokenizer(tcfg.tokenizer) if tcfg.tokenizer is not None else None
    except (OSError, TokenizerError) as e:
        raise ConfigError(f"{where}.tokenizer", f"teacher {tcfg.name!r}: {e}") from e
    vocab = teacher_tok.vocab_size if teacher_tok is not None else student_tok.vocab_size
    if tcfg.placement == "remote":
        inner = _remote(where, tcfg, cfg, groups, vocab)
    elif tcfg.placement == "vllm":
        inner = _vllm(where, tcfg, cfg, groups)
    else:
        try:
            ckpt = verified_checkpoint(tcfg.checkpoint, checksums=cfg.train.verify_checksums)
        except CheckpointError as e:
            raise CheckpointError(f"{where}: teacher {tcfg.name!r}: {e}") from None
        _check_colocated_vocabulary(where, tcfg, ckpt, vocab, teacher_tok, student_tok)
        pad = teacher_tok.pad_id if teacher_tok is not None else student_tok.pad_id
        try:
            inner = build_colocated_teacher(tcfg, groups, vocab, pad)
        except TeacherError as e:
            raise ConfigError(where, str(e)) from e
    if teacher_tok is None:
        return inner
    return CrossTokenizerTeacher(
        inner,
        student_tok,
        template_for(student_tok, cfg.tokenizer.chat_template),
        teacher_tok,
        template_for(teacher_tok, tcfg.tokenizer.chat_template),
        teacher_prompt=PromptRenderer.from_config(teacher_tok, tcfg.tokenizer),
    )


def build_teachers(cfg: RunConfig, groups: ParallelGroups, student_tok: Tokenizer) -> dict[str, Teacher]:
    """All teachers of the run by name, in config order (self-distillation teachers are built by the
    trainer, which owns the student they copy)."""
    validate_mopd_config(cfg)
    return {t.name: build_teacher(i, t, cfg, groups, student_tok) for i, t in enumerate(cfg.teachers)}
