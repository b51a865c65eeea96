"""Hugging Face model directories wherever a checkpoint is accepted.

A directory holding ``config.json`` is an HF model (:func:`is_hf_dir`). Its architecture and tokenizer
give a :class:`ModelConfig` and a :class:`TokenizerConfig` (:func:`model_config_from_hf`); fields a user
also gave must agree with it (:func:`merge_model_config`). :func:`materialise` converts it, once, into
a checkpoint of this project under ``cache_root/<content hash>/``; a second call with the same files
(a resumed run, another teacher) finds the conversion and reuses it. The key is a hash of the bytes of
``config.json``, every weight file and the tokenizer files, plus the conversion options, so a changed
file converts again and a renamed or copied directory does not. The converted checkpoint is a Megatron
distributed checkpoint, so it loads at any TP/PP/EP whatever layout converted it; converting at the
run's layout only spreads the conversion's memory over the run's ranks.

Every problem found before conversion is one line naming the file or field: an unsupported
architecture, weights that disagree with ``config.json`` (missing or extra tensors, wrong shapes), a
directory without a tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch.distributed as dist

from opd_megatron.config import ConfigError, ModelConfig, TokenizerConfig
from opd_megatron.distributed import ParallelGroups
from opd_megatron.models.checkpoint import read_config
from opd_megatron.models.hf_convert import (
    HF_SIDE_DIR,
    import_hf_checkpoint,
    read_hf_config,
    real_vocab_size,
    validate_hf_weights,
)
from opd_megatron.models.hf_convert import model_config_from_hf as _model_config_from_config
from opd_megatron.models.hf_safetensors import (
    SAFETENSORS_INDEX,
    SAFETENSORS_SINGLE,
    ConversionError,
    HFWeights,
    PlannedTensor,
    write_shard,
)

__all__ = [
    "Materialised",
    "apply_hf_model_config",
    "content_hash",
    "guess_chat_template",
    "is_hf_dir",
    "materialise",
    "merge_model_config",
    "model_config_from_hf",
    "tokenizer_config_from_hf",
]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "chat_template.jinja")
# Fields that describe where and how the model runs rather than what it computes: a user may set them
# freely next to an HF directory.
_RUN_FIELDS = frozenset(
    {
        "params_dtype",
        "transformer_impl",
        "fp8",
        "init_method_std",
        "moe_aux_loss_coeff",
        "max_sequence_length",
        "make_vocab_size_divisible_by",
    }
)
"""Fields a run may set whatever the HF config says (``max_sequence_length``: the context the run trains
and samples in; RoPE models run at any length up to what they were trained for;
``make_vocab_size_divisible_by``: the padding of the embedding the run builds, whose padding rows are
never predicted, so a checkpoint padded otherwise loads into it)."""


def is_hf_dir(path: str | os.PathLike | None) -> bool:
    """True for a directory with ``config.json`` (checkpoints of this project have ``meta.json``)."""
    return path is not None and (Path(path) / "config.json").is_file()


def _jinja_template(hf_dir: Path) -> str:
    """The directory's Jinja chat template (``chat_template.jinja``, else tokenizer_config.json's
    ``chat_template``), or ``""``."""
    if (hf_dir / "chat_template.jinja").is_file():
        return (hf_dir / "chat_template.jinja").read_text()
    if (hf_dir / "tokenizer_config.json").is_file():
        try:
            return str(json.loads((hf_dir / "tokenizer_config.json").read_text()).get("chat_template") or "")
        except json.JSONDecodeError as e:
            raise ConversionError(f"{hf_dir / 'tokenizer_config.json'}: invalid JSON: {e}") from None
    return ""


def guess_chat_template(hf_dir: str | os.PathLike) -> str:
    """The built-in chat template whose markers the directory's Jinja template uses, else ``plain``."""
    text = _jinja_template(Path(hf_dir))
    if "<|im_start|>" in text:
        return "chatml"
    if "<|start_header_id|>" in text:
        return "llama3"
    return "plain"


def tokenizer_config_from_hf(hf_dir: str | os.PathLike) -> TokenizerConfig:
    """``tokenizer.json`` -> kind ``hf``; ``tokenizer.model`` -> kind ``sentencepiece``; else an error.

    The chat template: with ``tokenizer.json`` and a Jinja template in the directory, ``model`` (the
    model's own template, rendered by ``transformers``), without one ``plain``; a SentencePiece model
    takes the built-in template whose markers its Jinja template uses (:func:`guess_chat_template`).
    """
    d = Path(hf_dir)
    if (d / "tokenizer.json").is_file():  # the directory: it also holds the model's chat template
        template = "model" if _jinja_template(d).strip() else "plain"
        return TokenizerConfig(kind="hf", path=str(d.resolve()), chat_template=template)
    if (d / "tokenizer.model").is_file():
        return TokenizerConfig(
            kind="sentencepiece",
            path=str((d / "tokenizer.model").resolve()),
            chat_template=guess_chat_template(d),
        )
    raise ConversionError(
        f"{d}: no tokenizer.json or tokenizer.model; the HF directory must carry the model's tokenizer"
    )


def model_config_from_hf(
    hf_dir: str | os.PathLike, *, params_dtype: str | None = None
) -> tuple[ModelConfig, TokenizerConfig]:
    """The model and tokenizer configs of an HF directory (no weights read; :func:`materialise` checks
    them). ``model.vocab_size`` is the checkpoint's embedding row count, which may exceed the
    tokenizer's size (see :mod:`opd_megatron.models.gpt`)."""
    hf = read_hf_config(hf_dir)
    try:
        _, cfg = _model_config_from_config(hf, params_dtype=params_dtype)
    except ConversionError as e:
        raise ConversionError(f"{Path(hf_dir) / 'config.json'}: {e}") from None
    return cfg, tokenizer_config_from_hf(hf_dir)


def merge_model_config(
    given: ModelConfig | dict | None, from_hf: ModelConfig, where: str = "model"
) -> ModelConfig:
    """``from_hf`` with the user's run-time fields applied.

    ``given`` is the user's ``model:`` section: a dict of the fields they wrote, or a ModelConfig (then
    the fields that differ from the defaults count as written). A written architecture field that
    contradicts the HF config raises a ConfigError naming both values; run-time fields (dtype,
    transformer implementation, FP8, init std, MoE aux-loss weight) are taken from ``given``.
    """
    if given is None:
        return from_hf
    if isinstance(given, ModelConfig):
        default = ModelConfig()
        given = {
            f.name: getattr(given, f.name)
            for f in fields(ModelConfig)
            if getattr(given, f.name) != getattr(default, f.name)
        }
    merged = {f.name: getattr(from_hf, f.name) for f in fields(ModelConfig)}
    for name, value in given.items():
        if name not in merged:
            raise ConfigError(f"{where}.{name}", "unknown key for ModelConfig")
        if name in _RUN_FIELDS:
            merged[name] = value
        elif value != merged[name] and not _same_derived(name, value, from_hf):
            raise ConfigError(
                f"{where}.{name}",
                f"given {value!r} but the HF config says {merged[name]!r}; remove the field or fix it",
            )
    return ModelConfig(**merged)


def apply_hf_model_config(data: dict, source: str = "train.init_checkpoint") -> dict:
    """Fill a raw run-config mapping's ``model`` (and, when absent, ``tokenizer``) from the HF directory
    at the dotted path ``source``, before the mapping becomes a RunConfig (whose checks need the real
    head counts). The fields the mapping already has in ``model`` are checked against the HF config
    (:func:`merge_model_config`). A mapping whose ``source`` is not an HF directory is returned as is.
    Reads only config.json and the tokenizer files; no process group is needed.
    """
    from opd_megatron.config import to_dict

    node = data
    for part in source.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, str) or not is_hf_dir(node):
        return data
    try:
        from_hf, tokenizer = model_config_from_hf(node)
    except ConversionError as e:
        raise ConfigError(source, str(e)) from None
    given = data.get("model") or {}
    if not isinstance(given, dict):
        raise ConfigError("model", f"expected a mapping, got {type(given).__name__}")
    out = dict(data)
    out["model"] = to_dict(merge_model_config(given, from_hf))
    given_tok = data.get("tokenizer")
    if given_tok is None:
        out["tokenizer"] = to_dict(tokenizer)
    elif isinstance(given_tok, dict) and "path" not in given_tok and "kind" not in given_tok:
        # Template settings given without the tokenizer itself: the directory's tokenizer with them.
        out["tokenizer"] = {**to_dict(tokenizer), **given_tok}
    return out


def _same_derived(name: str, value, cfg: ModelConfig) -> bool:
    # Fields whose None in the HF-derived config means "derived": an explicit equal value agrees.
    derived = {
        "num_query_groups": cfg.query_groups,
        "ffn_hidden_size": cfg.ffn_size,
        "head_dim": cfg.kv_channels,
        "moe_ffn_hidden_size": cfg.expert_ffn_size if cfg.num_experts is not None else None,
    }
    return name in derived and value == derived[name]


def _source_files(hf_dir: Path) -> list[Path]:
    files = [hf_dir / "config.json"]
    index = hf_dir / SAFETENSORS_INDEX
    if index.is_file():
        files.append(index)
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files += [hf_dir / n for n in sorted(set(weight_map.values()))]
    else:
        files.append(hf_dir / "model.safetensors")
    files += [hf_dir / n for n in _TOKENIZER_FILES if (hf_dir / n).is_file()]
    return files


def content_hash(hf_dir: str | os.PathLike, extra: str = "") -> str:
    """Hex digest (32 characters) of the bytes of config.json, the weight files and the tokenizer files
    (names included, so a renamed shard counts), plus ``extra`` (conversion options)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(extra.encode())
    for path in _source_files(Path(hf_dir)):
        if not path.is_file():
            raise ConversionError(f"{path}: missing (named by the HF directory's index or required)")
        h.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


BEYOND_TOKENIZER_DIR = "rows_beyond_tokenizer"
"""Sub-directory of a converted checkpoint holding the source's embedding (and untied output) rows beyond
the tokenizer's ids, as HF tensors: a live model never holds them, an export writes them back."""


@dataclass(frozen=True)
class Materialised:
    """A converted HF directory: the checkpoint to load, and whether this call converted it."""

    checkpoint: Path
    converted: bool
    model: ModelConfig
    tokenizer: TokenizerConfig
    beyond_tokenizer: Path | None = None
    """The source's rows beyond the tokenizer (:data:`BEYOND_TOKENIZER_DIR`); None when it has none."""


def _keep_rows_beyond_tokenizer(hf_dir: Path, final: Path, cfg: ModelConfig, real_vocab: int) -> Path | None:
    """Write (once, rank 0) the HF directory's rows at and after ``real_vocab`` of the embedding and the
    untied output layer into ``final/rows_beyond_tokenizer/model.safetensors``; returns the directory."""
    if not cfg.vocab_size or cfg.vocab_size <= real_vocab:
        return None
    out = final / BEYOND_TOKENIZER_DIR
    if (out / SAFETENSORS_SINGLE).is_file():
        return out
    weights = HFWeights(hf_dir)
    names = ["model.embed_tokens.weight"] + ([] if cfg.tie_embeddings else ["lm_head.weight"])
    rows = {n: weights.read(n, dim=0, start=real_vocab) for n in names}
    staging = final / f".{BEYOND_TOKENIZER_DIR}.partial"
    staging.mkdir(parents=True, exist_ok=True)
    plan = [PlannedTensor(n, tuple(t.shape), t.dtype, lambda t=t: t) for n, t in rows.items()]
    write_shard(staging / SAFETENSORS_SINGLE, plan, {"format": "pt"})
    os.replace(staging, out)
    return out


def _broadcast(obj):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def materialise(
    hf_dir: str | os.PathLike,
    groups: ParallelGroups,
    cache_root: str | os.PathLike,
    *,
    params_dtype: str | None = None,
    where: str = "",
) -> Materialised:
    """Convert ``hf_dir`` into ``cache_root/<content hash>/`` unless that conversion exists; collective.

    Checks the directory first (architecture, tokenizer, tensor names and shapes against config.json),
    raising a ConfigError at field path ``where`` (e.g. ``teachers[0].checkpoint``) with a one-line
    message naming the file. Rank 0 hashes the files and tells the others, so a large checkpoint is read
    once. The conversion writes into a staging directory and renames it when complete, so an interrupted
    conversion is redone, never reused. The returned ``tokenizer`` points at the copy inside the
    converted checkpoint, so the cache entry is self-contained.
    """
    hf_dir = Path(hf_dir)
    try:
        model_cfg, tok_cfg = model_config_from_hf(hf_dir, params_dtype=params_dtype)
        validate_hf_weights(HFWeights(hf_dir), model_cfg)
        real_vocab = real_vocab_size(hf_dir, model_cfg.vocab_size)
        options = json.dumps(
            {"params_dtype": params_dtype, "divisible_by": model_cfg.make_vocab_size_divisible_by}
        )
        digest = _broadcast(content_hash(hf_dir, options) if groups.global_rank == 0 else None)
    except ConversionError as e:
        raise ConfigError(where, str(e)) from None
    root = Path(cache_root) / digest
    final = root / "step_0000000"
    # Every rank sees the same filesystem answer only after rank 0 decided; decide once and share it.
    exists = _broadcast((final / "meta.json").is_file() if groups.global_rank == 0 else None)
    if not exists:
        try:
            import_hf_checkpoint(hf_dir, root, groups, params_dtype=params_dtype, overwrite=True)
        except ConversionError as e:
            raise ConfigError(where, str(e)) from None
    beyond = (
        _keep_rows_beyond_tokenizer(hf_dir, final, model_cfg, real_vocab) if groups.global_rank == 0 else None
    )
    beyond = _broadcast(beyond)  # also: no rank goes on before the rows are written
    side = final / HF_SIDE_DIR
    # An HF tokenizer is its directory (it holds the chat template too); a SentencePiece model its file.
    tok_file = side if Path(tok_cfg.path).is_dir() else side / Path(tok_cfg.path).name
    tokenizer = TokenizerConfig(
        kind=tok_cfg.kind, path=str(tok_file.resolve()), chat_template=tok_cfg.chat_template
    )
    # The converted checkpoint's own config (its dtype may come from the weights, not config.json).
    return Materialised(
        checkpoint=final, converted=not exists, model=read_config(final).model, tokenizer=tokenizer,
        beyond_tokenizer=beyond,
    )  # fmt: skip
