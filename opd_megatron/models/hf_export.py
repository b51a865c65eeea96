"""Export a live (training) Megatron model as a Hugging Face model directory, from any TP/PP/EP layout.

Nothing is gathered across pipeline stages or expert-parallel ranks: each (stage, expert-parallel rank)
has one writer (TP rank 0 of the first replica), which all-gathers each of its parameters over the TP
group, splits it into the HF tensors it is made of and streams them into its own safetensors shard
(``model-0000i-of-0000n.safetensors``; one writer writes ``model.safetensors``). Global rank 0 then
writes the index, ``config.json``, ``generation_config.json``, the tokenizer files and the chat
template, and renames the staging directory into place, so ``out_dir`` appears complete or not at all.
Peak memory per writer: one full (TP-gathered) parameter at a time on top of the model.

Embedding rows: the export writes ``max(model.vocab_size, real vocabulary)`` rows, the checkpoint's row
count when the model came from one with more rows than its tokenizer. The live model holds only the
tokenizer's rows (see :mod:`opd_megatron.models.gpt`); the rows after them are the source checkpoint's
own, unchanged, when the model came from a Hugging Face directory (``beyond_tokenizer``: what conversion
kept of them, :data:`~opd_megatron.models.hf_dir.BEYOND_TOKENIZER_DIR`), else zeros. No token id the
tokenizer produces reaches them either way; zero output rows give those ids logit 0 in transformers or
vLLM, so a sampler that does not suppress ids beyond the tokenizer can draw them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from opd_megatron.config import ModelConfig
from opd_megatron.distributed import ParallelGroups
from opd_megatron.models.hf_convert import (
    HF_SIDE_FILES,
    architecture_for,
    default_architecture,
    hf_config_from_model_config,
    hf_tensor_shapes,
    split_fused,
    tensor_links,
)
from opd_megatron.models.hf_safetensors import (
    SAFETENSORS_INDEX,
    SAFETENSORS_SINGLE,
    ConversionError,
    HFWeights,
    PlannedTensor,
    copy_files,
    replace_dir,
    write_shard,
)

__all__ = ["EXPORT_MARKER", "check_export_target", "chat_template_jinja", "export_hf", "export_step"]

EXPORT_MARKER = "opd_megatron_export.json"
"""A file in a run's export naming the run (its output directory) and the step exported: what lets a
later run replace the directory (its own earlier export) and a resumed run tell whether it is current."""

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def chat_template_jinja(name: str) -> str:
    """A Jinja chat template (HF ``apply_chat_template`` format) rendering this project's template
    ``name`` (``chatml``, ``llama3``, ``glm``, ``plain``) the way the sampler renders prompts."""
    from opd_megatron.tokenization.chat_templates import ROLES, get_template

    t = get_template(name)

    def text(segments) -> str:
        return "".join(s.text for s in segments).replace("'", "\\'").replace("\n", "\\n")

    headers = ", ".join(f"'{r}': '{text(t.headers[r])}'" for r in ROLES)
    return (
        f"{{%- set headers = {{{headers}}} -%}}"
        f"{{{{- '{text(t.prefix)}' -}}}}"
        "{%- for message in messages -%}"
        "{{- headers[message['role']] + message['content'] -}}"
        f"{{{{- '{text(t.footer)}' -}}}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- headers['assistant'] -}}{%- endif -%}"
    )


def _gather_tp(local: torch.Tensor, kind: str, tp_dim: int | None, groups: ParallelGroups) -> torch.Tensor:
    """The TP=1 parameter from this rank's shard (collective over the TP group)."""
    if tp_dim is None or groups.tp_size == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(groups.tp_size)]
    dist.all_gather(parts, local.contiguous(), group=groups.tp_group)
    if kind == "fc1":  # each shard is [gate_r; up_r]; the full parameter is [gate; up]
        gates, ups = zip(*(p.chunk(2, dim=0) for p in parts))
        return torch.cat([*gates, *ups], dim=0)
    # Fused QKV: whole key/value groups are contiguous per rank, so rank shards concatenate.
    return torch.cat(parts, dim=tp_dim)


def _vocab_rows(full_VH: torch.Tensor, name: str, rows: int, real_vocab: int, beyond) -> torch.Tensor:
    """The ``rows`` HF rows of a vocabulary parameter: the model's rows of the tokenizer's ids, then the
    source's own rows beyond them (``beyond``: HFWeights, when it has them for exactly these rows), else
    the model's padding rows and zeros."""
    if beyond is not None and name in beyond and beyond.shape(name) == (rows - real_vocab, full_VH.shape[1]):
        return torch.cat([full_VH[:real_vocab], beyond.read(name).to(full_VH.dtype)])
    full_VH = full_VH[:rows]
    if full_VH.shape[0] < rows:  # rows beyond those the model holds: unreachable, zero
        full_VH = torch.cat([full_VH, full_VH.new_zeros(rows - full_VH.shape[0], full_VH.shape[1])])
    return full_VH


def _my_tensors(
    model, cfg: ModelConfig, groups: ParallelGroups, rows: int, dtype: torch.dtype, writer: bool, beyond=None
):
    """HF name -> tensor for what this rank's (stage, EP rank) owns; only the writer keeps them.

    Non-writer TP ranks still take part in every all-gather. Collective over the TP group, in the same
    parameter order on every TP rank."""
    out: dict[str, torch.Tensor] = {}
    owns_dense = groups.ep_rank == 0  # replicated non-expert parameters: written by EP rank 0 only
    for link in tensor_links(model, cfg, groups.ep_rank, groups.ep_size):
        is_expert = ".mlp.experts." in link.hf_names[0]
        tied_copy = (
            cfg.tie_embeddings and not model.pre_process and link.hf_names == ("model.embed_tokens.weight",)
        )
        full = _gather_tp(link.param.detach(), link.kind, link.tp_dim, groups)
        if not writer or tied_copy or not (is_expert or owns_dense):
            continue
        if link.kind == "vocab":
            name = link.hf_names[0]
            out[name] = _vocab_rows(full, name, rows, model.real_vocab_size, beyond).to(dtype).contiguous()
            continue
        for name, tensor in zip(link.hf_names, split_fused(link, full, cfg, rows)):
            out[name] = tensor.to(dtype).contiguous()
    return out


def _tokenizer_files(tokenizer, staging: Path) -> dict:
    """Write the tokenizer side files into ``staging``; returns ids for generation_config.json."""
    from opd_megatron.tokenization.hf_tok import HFTokenizer

    if isinstance(tokenizer, str | os.PathLike):
        src = Path(tokenizer)
        if not (src / "tokenizer.json").is_file() and not (src / "tokenizer.model").is_file():
            raise ConversionError(f"{src}: no tokenizer.json or tokenizer.model to export with the model")
        copy_files(src, staging, [n for n in HF_SIDE_FILES if n != "config.json"])
        base = src / "config.json"
        return {"base": json.loads(base.read_text()) if base.is_file() else None}
    if not isinstance(tokenizer, HFTokenizer):
        raise ConversionError(
            f"export needs an HF tokenizer (tokenizer.json) or a directory holding one, got {type(tokenizer).__name__}"
        )
    (staging / "tokenizer.json").write_text(tokenizer.json_str, encoding="utf-8")
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tokenizer.eos_token}
    if tokenizer.bos_token is not None:
        tok_cfg["bos_token"] = tokenizer.bos_token
    tok_cfg["pad_token"] = tokenizer.pad_token or tokenizer.eos_token
    (staging / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    ids = {"eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    if tokenizer.bos_id is not None:
        ids["bos_token_id"] = tokenizer.bos_id
    return {"base": None, "ids": ids}


def export_hf(
    model,
    model_cfg: ModelConfig,
    tokenizer,
    out_dir: str | os.PathLike,
    groups: ParallelGroups,
    *,
    chat_template: str = "plain",
    dtype: str | None = None,
    architecture: str | None = None,
    marker: dict | None = None,
    beyond_tokenizer: str | os.PathLike | None = None,
) -> Path:
    """Write this rank's model stage, with every other rank's, as one HF model directory; collective.

    ``tokenizer``: a directory with the HF tokenizer files (the source HF directory, or a converted
    checkpoint's ``hf/`` folder; its ``config.json``, generation config and chat template are kept) or an
    :class:`~opd_megatron.tokenization.hf_tok.HFTokenizer` (then ``chat_template``, a built-in template
    name, is written as ``chat_template.jinja`` and a generation config is made from its special tokens).
    ``dtype`` defaults to ``model_cfg.params_dtype``; ``architecture`` to the source directory's, else
    the class whose layers the model has. ``marker`` (a training run's output directory and step) is
    written as :data:`EXPORT_MARKER`. ``beyond_tokenizer``: a directory of the source checkpoint's rows
    beyond the tokenizer (see the module docstring). Returns ``out_dir``, replaced atomically if it exists.
    """
    out = Path(out_dir)
    staging = out.parent / f".{out.name}.partial"
    out_dtype = _DTYPES[dtype or model_cfg.params_dtype]
    real_vocab = model.real_vocab_size
    rows = max(model_cfg.vocab_size or 0, real_vocab)
    # One writer per (stage, EP rank): expert tensor parallelism equals TP, so TP rank 0 of the first
    # expert replica holds, after the TP gather, every tensor of its stage and EP rank.
    writer = groups.tp_rank == 0 and groups.expert_dp_rank == 0
    n_writers = groups.pp_size * groups.ep_size
    index = groups.pp_rank * groups.ep_size + groups.ep_rank
    if groups.global_rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    if dist.is_initialized():
        dist.barrier()
    beyond = HFWeights(beyond_tokenizer) if beyond_tokenizer is not None and writer else None
    tensors = _my_tensors(model, model_cfg, groups, rows, out_dtype, writer, beyond)
    weight_map: dict[str, str] = {}
    if writer:
        fname = (
            SAFETENSORS_SINGLE if n_writers == 1 else f"model-{index + 1:05d}-of-{n_writers:05d}.safetensors"
        )
        order = [n for n in hf_tensor_shapes(model_cfg, rows) if n in tensors]
        plan = [PlannedTensor(n, tuple(tensors[n].shape), out_dtype, lambda t=tensors[n]: t) for n in order]
        write_shard(staging / fname, plan, {"format": "pt"})
        weight_map = {n: fname for n in order}
    del tensors
    maps: list = [weight_map]
    if dist.is_initialized() and dist.get_world_size() > 1:
        maps = [None] * dist.get_world_size()
        dist.all_gather_object(maps, weight_map)
    if groups.global_rank == 0:
        merged = {k: v for m in maps for k, v in m.items()}
        expected = hf_tensor_shapes(model_cfg, rows)
        assert set(merged) == set(expected), sorted(set(merged) ^ set(expected))
        if n_writers > 1:
            size = sum(
                torch.Size(s).numel() * torch.empty((), dtype=out_dtype).element_size()
                for s in expected.values()
            )
            (staging / SAFETENSORS_INDEX).write_text(
                json.dumps({"metadata": {"total_size": size}, "weight_map": merged}, indent=2) + "\n"
            )
        side = _tokenizer_files(tokenizer, staging)
        base = side["base"]
        if architecture is None:
            architecture = architecture_for(base) if base is not None else default_architecture(model_cfg)
        hf_cfg = hf_config_from_model_config(model_cfg, rows, architecture, out_dtype, base)
        hf_cfg.update(side.get("ids", {}))
        _write_side_files(staging, hf_cfg, chat_template, marker)
        replace_dir(staging, out)
    if dist.is_initialized():
        dist.barrier()
    return out


def _write_side_files(staging: Path, hf_cfg: dict, chat_template: str, marker: dict | None) -> None:
    """config.json, a chat template and a generation config unless the tokenizer files brought them,
    and the run's marker."""
    (staging / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
    if not (staging / "chat_template.jinja").is_file() and not _has_template(staging):
        (staging / "chat_template.jinja").write_text(chat_template_jinja(chat_template))
    if not (staging / "generation_config.json").is_file():
        ids = ("bos_token_id", "eos_token_id", "pad_token_id")
        gen = {k: hf_cfg[k] for k in ids if hf_cfg.get(k) is not None}
        (staging / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if marker is not None:
        (staging / EXPORT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def _overlaps(a: Path, b: Path) -> bool:
    """``a`` and ``b`` are the same directory or one lies inside the other."""
    return a == b or a in b.parents or b in a.parents


def _read_marker(out: Path) -> dict | None:
    try:
        marker = json.loads((out / EXPORT_MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return marker if isinstance(marker, dict) else None


def export_step(out: str | os.PathLike, output_dir: str | os.PathLike) -> int | None:
    """The step of the export at ``out`` written by the run of ``output_dir``, or None (no export there,
    or one of another run or without a marker)."""
    marker = _read_marker(Path(out))
    if marker is None or marker.get("output_dir") != str(Path(output_dir).resolve()):
        return None
    step = marker.get("step")
    return step if isinstance(step, int) else None


def check_export_target(cfg) -> None:
    """``train.export_hf`` of RunConfig ``cfg`` is a directory the export may replace: not the init
    checkpoint's or a teacher's directory (nor inside or around one), not the run's output directory or
    one holding it, and either absent, empty, or an earlier export of this run (its marker names the
    run's output directory). Raises a one-line ConfigError naming ``train.export_hf``."""
    from opd_megatron.config import ConfigError

    if not cfg.train.export_hf:
        return
    out = Path(cfg.train.export_hf).resolve()
    sources = [("train.init_checkpoint", cfg.train.init_checkpoint)]
    sources += [(f"teachers[{i}].checkpoint", t.checkpoint) for i, t in enumerate(cfg.teachers)]
    for field, path in sources:
        if path and _overlaps(out, Path(path).resolve()):
            raise ConfigError(
                "train.export_hf", f"{out} is or overlaps {field} ({path}); the export would replace it"
            )
    run_dir = Path(cfg.train.output_dir).resolve()
    if out == run_dir or out in run_dir.parents:
        raise ConfigError("train.export_hf", f"{out} holds train.output_dir ({run_dir}); choose another")
    if out.exists() and not out.is_dir():
        raise ConfigError("train.export_hf", f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and _read_marker(out) is None:
        raise ConfigError(
            "train.export_hf",
            f"{out} is a non-empty directory that is no export of this project; the export would replace "
            "it: choose another directory or empty it",
        )
    marker = _read_marker(out) if out.is_dir() else None
    if marker is not None and marker.get("output_dir") != str(run_dir):
        raise ConfigError(
            "train.export_hf",
            f"{out} holds the export of another run ({marker.get('output_dir')}); choose another directory",
        )


def _has_template(directory: Path) -> bool:
    cfg = directory / "tokenizer_config.json"
    return cfg.is_file() and bool(json.loads(cfg.read_text()).get("chat_template"))
