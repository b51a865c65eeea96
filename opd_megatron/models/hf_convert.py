"""Hugging Face <-> Megatron checkpoint conversion for the Llama, Qwen2, Qwen3 and Qwen3-MoE families.

All are what :mod:`opd_megatron.models.gpt` builds: RMSNorm, SwiGLU, rotary embeddings (rotate-half, the
same convention in both code bases, so query/key weights need no permutation; Llama-3.x ``llama3`` and
``linear`` RoPE scaling), grouped-query attention, tied or untied embeddings; Qwen2 adds a bias on the
query/key/value projections; Qwen3 a per-head RMSNorm on queries and keys (``q_norm``/``k_norm`` ->
``q_layernorm``/``k_layernorm``) and an explicit ``head_dim`` (Megatron's ``kv_channels``); Qwen3-MoE
replaces every MLP by a softmax top-k router (``mlp.gate`` -> ``mlp.router``) over SwiGLU experts
(``mlp.experts.{j}`` -> ``mlp.experts.local_experts.{j - first}`` on the expert-parallel rank that owns
expert ``j``; experts are split evenly and in order over the EP group).

Import builds this rank's GPTModel stage at the requested TP/PP, copies each HF tensor (only this rank's
slice of it is read from disk) into the parameter it belongs to, and saves an ordinary checkpoint of this
project with :func:`~opd_megatron.models.checkpoint.save_checkpoint`. That checkpoint is a Megatron
distributed checkpoint, so it loads at any TP/PP afterwards, whatever layout converted it; converting at
TP>1 or PP>1 (under ``torchrun``) only spreads the memory of the conversion over more processes.
Tensors are mapped by *module*, so the same code fills the local layer spec (CPU) and the Transformer
Engine spec (norm weights fused into ``linear_qkv`` / ``linear_fc1``).

Export loads a checkpoint (saved at any TP/PP) into a TP=1/PP=1 model and streams the HF tensors into
safetensors shards of bounded size, one tensor at a time.

Memory: the weights exist once, plus one tensor in flight, plus what Megatron's dist_checkpointing adds
on CPU: on save it clones the gate/up halves of every ``linear_fc1`` (views are cloned before writing),
on load it reassembles them with a ``cat`` before copying. Measured peaks are 1.3-1.45x the checkpoint
above the process's fixed cost (``tools/bench/bench_convert.py``), never 2x.

Layout facts the mapping relies on:

* Megatron fuses Q, K and V into one ``linear_qkv`` whose output rows are grouped per key/value head:
  ``[q heads of group 0, k_0, v_0, q heads of group 1, k_1, v_1, ...]`` (``SelfAttention.
  get_query_key_value_tensors`` views the output as ``[groups, (heads/groups + 2) * head_dim]``). HF's
  ``repeat_kv`` serves query heads ``j*n .. (j+1)*n - 1`` with key/value head ``j``, which is the same
  grouping. Because whole groups are contiguous, a TP rank's fused shard is the fusion of its row shards
  of ``q_proj``, ``k_proj`` and ``v_proj``.
* ``linear_fc1`` is ``[gate; up]`` on every rank, each half being that rank's shard of ``gate_proj`` /
  ``up_proj``; the distributed checkpoint stores the global ``[gate; up]``.
* The embedding and output layer have ``padded_vocab_size`` rows (TP-divisible); padding rows are zero on
  import and dropped on export. They are stored with ``allow_shape_mismatch``, so a load at a TP size with
  a different padding resizes them, and a model built for a smaller real vocabulary reads only its rows.
* Embedding rows beyond the tokenizer (``config.json``'s ``vocab_size`` larger than ``tokenizer.json``)
  are all imported and exported unchanged; the checkpoint's ``meta.json`` records the tokenizer's size as
  ``real_vocab_size``, which is what samplers and losses see (see :mod:`opd_megatron.models.gpt`).

A converted checkpoint also holds the HF side files under ``hf/`` (``config.json``,
``generation_config.json`` and the tokenizer files, verbatim), which export copies back.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from opd_megatron.config import ConfigError, ModelConfig, ParallelConfig, RunConfig, TokenizerConfig
from opd_megatron.distributed import ParallelGroups
from opd_megatron.models.hf_safetensors import (
    ConversionError,
    HFWeights,
    PlannedTensor,
    copy_files,
    parse_size,
    replace_dir,
    write_sharded,
)

__all__ = [
    "ConversionError",
    "HF_SIDE_DIR",
    "SUPPORTED_ARCHITECTURES",
    "default_architecture",
    "export_hf_checkpoint",
    "fuse_qkv",
    "hf_config_from_model_config",
    "hf_tensor_shapes",
    "hf_tokenizer_vocab_size",
    "import_hf_checkpoint",
    "model_config_from_hf",
    "real_vocab_size",
    "split_qkv",
    "validate_hf_weights",
]

HF_SIDE_DIR = "hf"
"""Directory inside a converted Megatron checkpoint that keeps the HF config and tokenizer files."""

HF_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
"""Non-weight files of an HF checkpoint that travel with the weights (those that exist are copied)."""


@dataclass(frozen=True)
class _Family:
    model_type: str
    qkv_bias: bool
    # Defaults of the transformers config class, for fields a config.json may omit.
    max_position_embeddings: int
    qk_norm: bool = False
    moe: bool = False
    head_dim: int | None = None  # None: hidden_size / num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False


SUPPORTED_ARCHITECTURES: dict[str, _Family] = {
    "LlamaForCausalLM": _Family("llama", qkv_bias=False, max_position_embeddings=2048),
    "Qwen2ForCausalLM": _Family("qwen2", qkv_bias=True, max_position_embeddings=32768),
    "Qwen3ForCausalLM": _Family(
        "qwen3", qkv_bias=False, max_position_embeddings=32768, qk_norm=True, head_dim=128
    ),
    "Qwen3MoeForCausalLM": _Family(
        "qwen3_moe", qkv_bias=False, max_position_embeddings=32768, qk_norm=True, moe=True
    ),
}

_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_CODES = {"F32": "fp32", "BF16": "bf16", "F16": "fp16"}
# Buffers some older checkpoints carry; they are recomputed from the config, never loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ----------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------


def read_hf_config(hf_dir: str | os.PathLike) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{hf_dir}: no config.json (is this a Hugging Face model directory?)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    return data


def architecture_for(hf: dict) -> str:
    archs = hf.get("architectures") or []
    if not archs:  # configs written without a model class still name the family
        by_type = {f.model_type: a for a, f in SUPPORTED_ARCHITECTURES.items()}
        if hf.get("model_type") in by_type:
            return by_type[hf["model_type"]]
    known = [a for a in archs if a in SUPPORTED_ARCHITECTURES]
    if len(archs) != 1 or not known:
        raise ConversionError(
            f"unsupported architecture {archs or hf.get('model_type')!r}: this converter handles "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return known[0]


_ROPE_WHY_NOT = {
    "dynamic": "dynamic NTK scaling recomputes the frequencies from each sequence's length, and "
    "megatron-core's RotaryEmbedding has fixed frequencies",
}
_ROPE_KINDS = ("linear", "llama3", "yarn")


def _rope(hf: dict, family: _Family) -> dict:
    """ModelConfig fields of the RoPE settings (``rotary_base`` and the ``rope_*`` scaling fields)."""
    # transformers >= 5 nests RoPE settings in rope_parameters; older configs use rope_theta/rope_scaling.
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kinds = {s.get("rope_type", s.get("type", "default")) for s in (params, scaling) if s} - {None, "default"}
    if len(kinds) > 1:
        raise ConversionError(f"config.json: rope_parameters and rope_scaling disagree ({sorted(kinds)})")
    kind = kinds.pop() if kinds else "default"
    source = scaling if scaling.get("rope_type", scaling.get("type")) == kind else params
    if float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))) != 1.0:
        raise ConversionError("config.json: partial_rotary_factor != 1 is not supported")
    theta = float(params.get("rope_theta", hf.get("rope_theta", family.rope_theta)))
    if theta != int(theta):
        raise ConversionError(
            f"config.json: rope_theta={theta} is not an integer; the Megatron model takes an integer base"
        )
    out: dict = {"rotary_base": theta}
    if kind == "default":
        return out
    if kind not in _ROPE_KINDS:
        why = _ROPE_WHY_NOT.get(kind, "the Megatron model would compute other rotary frequencies")
        raise ConversionError(
            f"config.json: RoPE scaling {kind!r} is not supported ({why}); supported: default, "
            + ", ".join(_ROPE_KINDS)
        )
    if kind == "yarn":
        return {**out, **_yarn(hf, family, source)}
    if source.get("factor") is None:
        raise ConversionError(f"config.json: RoPE scaling {kind!r} lacks its 'factor'")
    out.update(rope_scaling=kind, rope_scaling_factor=float(source["factor"]))
    if kind == "llama3":
        for key, field in (
            ("low_freq_factor", "rope_low_freq_factor"),
            ("high_freq_factor", "rope_high_freq_factor"),
            ("original_max_position_embeddings", "rope_original_max_position"),
        ):
            if source.get(key) is None:
                raise ConversionError(f"config.json: RoPE scaling 'llama3' lacks {key!r}")
            out[field] = float(source[key]) if "factor" in key else int(source[key])
    return out


def yarn_attention_factor(factor: float, mscale: float | None, mscale_all_dim: float | None) -> float:
    """YaRN's cos/sin multiplier as transformers derives it: ``m(factor, mscale) / m(factor,
    mscale_all_dim)`` when both are non-zero, else ``m(factor, 1)``, with ``m(s, k) = 0.1 k ln s + 1``
    (1 for ``s <= 1``)."""

    def m(scale: float, k: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * k * math.log(scale) + 1.0

    if mscale and mscale_all_dim:
        return m(factor, mscale) / m(factor, mscale_all_dim)
    return m(factor)


def _yarn(hf: dict, family: _Family, source: dict) -> dict:
    """ModelConfig fields of YaRN settings, filled in as transformers fills them."""
    max_pos = int(hf.get("max_position_embeddings", family.max_position_embeddings))
    original = source.get("original_max_position_embeddings")
    original = int(original or hf.get("original_max_position_embeddings") or max_pos)
    factor = source.get("factor")
    factor = float(factor) if factor is not None else max_pos / original
    if source.get("truncate", True) is not True:
        raise ConversionError(
            "config.json: YaRN with truncate=false is not supported (megatron-core's YarnRotaryEmbedding "
            "here rounds the correction range, as transformers' default does)"
        )
    mscale, mscale_all_dim = source.get("mscale"), source.get("mscale_all_dim")
    fields = dict(
        rope_scaling="yarn",
        rope_scaling_factor=factor,
        rope_original_max_position=original,
        rope_yarn_beta_fast=float(source.get("beta_fast") or 32.0),
        rope_yarn_beta_slow=float(source.get("beta_slow") or 1.0),
        rope_yarn_mscale=None if mscale is None else float(mscale),
        rope_yarn_mscale_all_dim=None if mscale_all_dim is None else float(mscale_all_dim),
    )
    given = source.get("attention_factor")
    derived = yarn_attention_factor(factor, fields["rope_yarn_mscale"], fields["rope_yarn_mscale_all_dim"])
    if given is not None and not math.isclose(float(given), derived, rel_tol=1e-6):
        raise ConversionError(
            f"config.json: YaRN attention_factor={given} differs from the {derived:.6g} that factor, mscale "
            "and mscale_all_dim give; megatron-core derives the factor from those and cannot take another"
        )
    return fields


def _moe(hf: dict) -> dict:
    """ModelConfig fields of a Qwen3-MoE config (every layer sparse, no shared expert)."""
    missing = [
        k for k in ("num_experts", "num_experts_per_tok", "moe_intermediate_size") if hf.get(k) is None
    ]
    if missing and not (missing == ["num_experts"] and hf.get("num_local_experts") is not None):
        raise ConversionError(f"config.json lacks {', '.join(missing)}")
    if int(hf.get("decoder_sparse_step", 1)) != 1 or hf.get("mlp_only_layers"):
        raise ConversionError(
            "config.json: decoder_sparse_step != 1 or mlp_only_layers (dense layers between MoE layers) is "
            "not supported: every layer must be an MoE layer"
        )
    if hf.get("shared_expert_intermediate_size"):
        raise ConversionError("config.json: shared experts are not supported")
    return dict(
        num_experts=int(hf.get("num_experts") or hf["num_local_experts"]),
        moe_router_topk=int(hf["num_experts_per_tok"]),
        moe_ffn_hidden_size=int(hf["moe_intermediate_size"]),
        moe_norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
    )


def model_config_from_hf(
    hf: dict, *, params_dtype: str | None = None, make_vocab_size_divisible_by: int = 16
) -> tuple[str, ModelConfig]:
    """The architecture name and the :class:`ModelConfig` of an HF ``config.json``.

    Raises :class:`ConversionError` for anything the Megatron model would compute differently
    (unsupported architecture, RoPE scaling other than linear/llama3, biases other than Qwen2's QKV bias,
    sliding-window attention, activations other than SiLU, MoE layouts other than Qwen3-MoE's).
    """
    arch = architecture_for(hf)
    family = SUPPORTED_ARCHITECTURES[arch]
    missing = [
        k
        for k in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "vocab_size",
        )
        if hf.get(k) is None
    ]
    if missing:
        raise ConversionError(f"config.json lacks {', '.join(missing)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"hidden_act={hf['hidden_act']!r} is not supported (SwiGLU needs 'silu')")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ConversionError(
            "attention_bias / mlp_bias are not supported: the Megatron model has biases only on the fused "
            "QKV projection (Qwen2)"
        )
    if hf.get("use_sliding_window") or any(t != "full_attention" for t in hf.get("layer_types") or []):
        raise ConversionError("sliding-window attention is not supported")
    heads, hidden = int(hf["num_attention_heads"]), int(hf["hidden_size"])
    head_dim = hf.get("head_dim") or family.head_dim
    if head_dim is None and hidden % heads:
        raise ConversionError(
            f"config.json: hidden_size={hidden} is not divisible by num_attention_heads={heads} and there is "
            "no head_dim"
        )
    # Only a head size that differs from hidden / heads needs recording (Megatron's kv_channels).
    head_dim = int(head_dim) if head_dim is not None and int(head_dim) * heads != hidden else None
    if params_dtype is None:
        name = hf.get("dtype") or hf.get("torch_dtype")
        params_dtype = _DTYPE_NAMES.get(str(name).removeprefix("torch.")) if name else None
    try:
        cfg = ModelConfig(
            num_layers=int(hf["num_hidden_layers"]),
            hidden_size=hidden,
            num_attention_heads=heads,
            num_query_groups=int(hf.get("num_key_value_heads") or heads),
            ffn_hidden_size=int(hf["intermediate_size"]),
            vocab_size=int(hf["vocab_size"]),
            make_vocab_size_divisible_by=make_vocab_size_divisible_by,
            max_sequence_length=int(hf.get("max_position_embeddings") or family.max_position_embeddings),
            tie_embeddings=bool(hf.get("tie_word_embeddings", family.tie_word_embeddings)),
            add_qkv_bias=family.qkv_bias,
            head_dim=head_dim,
            qk_layernorm=family.qk_norm,
            norm_epsilon=float(hf.get("rms_norm_eps", family.rms_norm_eps)),
            params_dtype=params_dtype or "fp32",
            **_rope(hf, family),
            **(_moe(hf) if family.moe else {}),
        )
    except ConfigError as e:
        raise ConversionError(f"config.json does not describe a valid model: model.{e}") from None
    return arch, cfg


def _hf_rope(cfg: ModelConfig) -> dict:
    """The HF ``rope_parameters`` of ``cfg`` (``rope_type``, ``rope_theta`` and the scaling's fields)."""
    rope: dict = {"rope_type": "default", "rope_theta": cfg.rotary_base}
    if cfg.rope_scaling != "none":
        rope.update(rope_type=cfg.rope_scaling, factor=cfg.rope_scaling_factor)
    if cfg.rope_scaling == "llama3":
        rope.update(
            low_freq_factor=cfg.rope_low_freq_factor,
            high_freq_factor=cfg.rope_high_freq_factor,
            original_max_position_embeddings=cfg.rope_original_max_position,
        )
    if cfg.rope_scaling == "yarn":
        rope.update(
            original_max_position_embeddings=cfg.rope_original_max_position,
            beta_fast=cfg.rope_yarn_beta_fast,
            beta_slow=cfg.rope_yarn_beta_slow,
        )
        for key in ("mscale", "mscale_all_dim"):
            value = getattr(cfg, f"rope_yarn_{key}")
            if value is not None:
                rope[key] = value
    return rope


def hf_config_from_model_config(
    cfg: ModelConfig,
    vocab_size: int,
    architecture: str,
    dtype: torch.dtype,
    base: dict | None = None,
) -> dict:
    """An HF ``config.json`` for ``cfg``: ``base`` (the config the model was imported from, if any) with
    every field the weights depend on set from ``cfg``, so a model trained after import exports right."""
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ConversionError(
            f"unsupported architecture {architecture!r}; choose one of {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    family = SUPPORTED_ARCHITECTURES[architecture]
    if cfg.add_qkv_bias != family.qkv_bias:
        raise ConversionError(
            f"{architecture} {'has' if family.qkv_bias else 'has no'} QKV bias but the checkpoint "
            f"{'has' if cfg.add_qkv_bias else 'has none'}; choose the other architecture"
        )
    if cfg.qk_layernorm != family.qk_norm or (cfg.num_experts is not None) != family.moe:
        raise ConversionError(
            f"{architecture} {'has' if family.qk_norm else 'has no'} QK norm and "
            f"{'MoE' if family.moe else 'dense'} layers, but the checkpoint has "
            f"{'QK norm' if cfg.qk_layernorm else 'no QK norm'} and "
            f"{'MoE' if cfg.num_experts is not None else 'dense'} layers; {_suggest_architecture(cfg)}"
        )
    out = dict(base or {})
    dtype_name = str(dtype).removeprefix("torch.")
    out.update(
        architectures=[architecture],
        model_type=family.model_type,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.query_groups,
        vocab_size=vocab_size,
        max_position_embeddings=cfg.max_sequence_length,
        rms_norm_eps=cfg.norm_epsilon,
        tie_word_embeddings=cfg.tie_embeddings,
        hidden_act="silu",
    )
    out.update(head_dim=cfg.kv_channels)
    if family.model_type == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    else:
        out.update(use_sliding_window=False)
        if family.model_type != "qwen2":
            out.update(attention_bias=False)
    if family.moe:
        out.update(
            num_experts=cfg.num_experts,
            num_experts_per_tok=cfg.moe_router_topk,
            moe_intermediate_size=cfg.expert_ffn_size,
            norm_topk_prob=cfg.moe_norm_topk_prob,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
    rope = _hf_rope(cfg)
    if isinstance(out.get("rope_parameters"), dict):  # keep the generation of format the base used
        out["rope_parameters"] = {**out["rope_parameters"], **rope}
    else:
        out.update(rope_theta=cfg.rotary_base, rope_scaling=rope if cfg.rope_scaling != "none" else None)
    out["dtype" if "dtype" in out else "torch_dtype"] = dtype_name
    return out


def _suggest_architecture(cfg: ModelConfig) -> str:
    if cfg.num_experts is not None:
        return "choose Qwen3MoeForCausalLM"
    if cfg.qk_layernorm:
        return "choose Qwen3ForCausalLM"
    return "choose Qwen2ForCausalLM" if cfg.add_qkv_bias else "choose LlamaForCausalLM"


def default_architecture(cfg: ModelConfig) -> str:
    """The HF class that computes what ``cfg`` builds (for models trained here from scratch)."""
    return _suggest_architecture(cfg).removeprefix("choose ")


# ----------------------------------------------------------------------------------------------------
# Tensor names, shapes and layouts
# ----------------------------------------------------------------------------------------------------


def hf_tensor_shapes(cfg: ModelConfig, vocab_size: int | None = None) -> dict[str, tuple[int, ...]]:
    """Every tensor an HF checkpoint of ``cfg`` holds, with its shape, in HF's own order."""
    v = vocab_size or cfg.vocab_size
    h, f = cfg.hidden_size, cfg.ffn_size
    d = cfg.kv_channels
    q, kv = cfg.num_attention_heads * d, cfg.query_groups * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (q, h)
        shapes[p + "self_attn.k_proj.weight"] = (kv, h)
        shapes[p + "self_attn.v_proj.weight"] = (kv, h)
        if cfg.add_qkv_bias:
            shapes[p + "self_attn.q_proj.bias"] = (q,)
            shapes[p + "self_attn.k_proj.bias"] = (kv,)
            shapes[p + "self_attn.v_proj.bias"] = (kv,)
        shapes[p + "self_attn.o_proj.weight"] = (h, q)
        if cfg.qk_layernorm:
            shapes[p + "self_attn.q_norm.weight"] = (d,)
            shapes[p + "self_attn.k_norm.weight"] = (d,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        if cfg.num_experts is None:
            shapes[p + "mlp.gate_proj.weight"] = (f, h)
            shapes[p + "mlp.up_proj.weight"] = (f, h)
            shapes[p + "mlp.down_proj.weight"] = (h, f)
            continue
        shapes[p + "mlp.gate.weight"] = (cfg.num_experts, h)
        fe = cfg.expert_ffn_size
        for j in range(cfg.num_experts):
            shapes[p + f"mlp.experts.{j}.gate_proj.weight"] = (fe, h)
            shapes[p + f"mlp.experts.{j}.up_proj.weight"] = (fe, h)
            shapes[p + f"mlp.experts.{j}.down_proj.weight"] = (h, fe)
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def validate_hf_weights(weights: HFWeights, cfg: ModelConfig) -> None:
    """Check names and shapes of every tensor against ``cfg`` before anything is built or read.

    A tied model may still carry ``lm_head.weight`` (some exporters write it); it is ignored.
    """
    expected = hf_tensor_shapes(cfg)
    present = set(weights.names())
    missing = [n for n in expected if n not in present]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ConversionError(
            f"{weights.directory}: tensors required by config.json are missing: {', '.join(missing[:5])}{more}"
        )
    allowed_extra = {"lm_head.weight"} if cfg.tie_embeddings else set()
    extra = sorted(n for n in present - set(expected) - allowed_extra if not n.endswith(_IGNORED_SUFFIXES))
    if extra:
        more = f" (and {len(extra) - 5} more)" if len(extra) > 5 else ""
        raise ConversionError(
            f"{weights.directory}: tensors not described by config.json (a different architecture or "
            f"layer count?): {', '.join(extra[:5])}{more}"
        )
    for name, shape in expected.items():
        if weights.shape(name) != shape:
            raise ConversionError(
                f"{weights.directory}: {name} has shape {list(weights.shape(name))} but config.json implies "
                f"{list(shape)}"
            )


def fuse_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_groups: int
) -> torch.Tensor:
    """HF ``q_proj`` ``[heads*d, ...]``, ``k_proj``/``v_proj`` ``[groups*d, ...]`` (weights or biases) ->
    Megatron's fused ``linear_qkv`` ``[groups * (heads/groups + 2) * d, ...]``, grouped per KV head."""
    rest = q.shape[1:]
    q_G = q.reshape(num_groups, -1, *rest)  # [groups, heads/groups * d, ...]
    k_G = k.reshape(num_groups, -1, *rest)  # [groups, d, ...]
    v_G = v.reshape(num_groups, -1, *rest)
    return torch.cat([q_G, k_G, v_G], dim=1).reshape(-1, *rest)


def split_qkv(
    qkv: torch.Tensor, num_heads: int, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_qkv`: ``(q, k, v)`` in HF layout (views into ``qkv``)."""
    rest = qkv.shape[1:]
    per_group = num_heads // num_groups
    qkv_G = qkv.reshape(num_groups, per_group + 2, -1, *rest)  # [groups, heads/groups + 2, d, ...]
    q, k, v = qkv_G.split([per_group, 1, 1], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


@dataclass(frozen=True)
class _Link:
    """One Megatron parameter of this rank and the HF tensors it is made of.

    ``kind``: ``copy`` (one HF tensor), ``qkv`` (q, k, v fused per group), ``fc1`` (gate and up stacked),
    ``vocab`` (embedding or output rows, padded). ``tp_dim``: the dimension along which each HF tensor is
    split across TP ranks (``None``: every rank holds all of it).
    """

    param: torch.nn.Parameter
    hf_names: tuple[str, ...]
    kind: str
    tp_dim: int | None


def _norm_weight(norm: torch.nn.Module, fused_into: torch.nn.Module) -> torch.nn.Parameter:
    # Local spec: a separate RMSNorm module. Transformer Engine spec: the norm is an IdentityOp and its
    # weight lives in the following fused linear as ``layer_norm_weight``.
    weight = getattr(norm, "weight", None)
    if weight is None:
        weight = fused_into.layer_norm_weight
    return weight


def _mlp_links(mlp, p: str, cfg: ModelConfig, ep_rank: int, ep_size: int) -> list[_Link]:
    """The dense MLP, or the router and this expert-parallel rank's experts of an MoE layer."""
    if cfg.num_experts is None:
        return [
            _Link(mlp.linear_fc1.weight, (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"), "fc1", 0),
            _Link(mlp.linear_fc2.weight, (p + "mlp.down_proj.weight",), "copy", 1),
        ]
    local = mlp.experts.local_experts
    # Megatron splits the experts of a layer into contiguous, equal blocks over the EP group.
    assert len(local) * ep_size == cfg.num_experts, (len(local), ep_size, cfg.num_experts)
    links = [_Link(mlp.router.weight, (p + "mlp.gate.weight",), "copy", None)]
    for i, expert in enumerate(local):
        e = f"{p}mlp.experts.{ep_rank * len(local) + i}."
        links += [
            _Link(expert.linear_fc1.weight, (e + "gate_proj.weight", e + "up_proj.weight"), "fc1", 0),
            _Link(expert.linear_fc2.weight, (e + "down_proj.weight",), "copy", 1),
        ]
    return links


def tensor_links(model, cfg: ModelConfig, ep_rank: int = 0, ep_size: int = 1) -> list[_Link]:
    """Every parameter of this pipeline stage (and expert-parallel rank), paired with its HF tensors."""
    links: list[_Link] = []
    if model.pre_process:
        links.append(
            _Link(model.embedding.word_embeddings.weight, ("model.embed_tokens.weight",), "vocab", 0)
        )
    for layer in model.decoder.layers:
        i = layer.layer_number - 1  # layer_number is global and 1-based, also on later pipeline stages
        p = f"model.layers.{i}."
        attn, mlp = layer.self_attention, layer.mlp
        qkv_names = tuple(p + f"self_attn.{x}_proj.weight" for x in "qkv")
        links += [
            _Link(
                _norm_weight(layer.input_layernorm, attn.linear_qkv),
                (p + "input_layernorm.weight",),
                "copy",
                None,
            ),
            _Link(attn.linear_qkv.weight, qkv_names, "qkv", 0),
            _Link(attn.linear_proj.weight, (p + "self_attn.o_proj.weight",), "copy", 1),
            _Link(
                # An MoE layer keeps its own pre-MLP norm (nothing to fuse it into).
                _norm_weight(layer.pre_mlp_layernorm, getattr(mlp, "linear_fc1", None)),
                (p + "post_attention_layernorm.weight",),
                "copy",
                None,
            ),
            *_mlp_links(mlp, p, cfg, ep_rank, ep_size),
        ]
        if cfg.qk_layernorm:
            links += [
                _Link(attn.q_layernorm.weight, (p + "self_attn.q_norm.weight",), "copy", None),
                _Link(attn.k_layernorm.weight, (p + "self_attn.k_norm.weight",), "copy", None),
            ]
        if cfg.add_qkv_bias:
            links.append(
                _Link(attn.linear_qkv.bias, tuple(n.replace(".weight", ".bias") for n in qkv_names), "qkv", 0)
            )
    if model.post_process:
        links.append(_Link(model.decoder.final_layernorm.weight, ("model.norm.weight",), "copy", None))
        if not cfg.tie_embeddings:
            links.append(_Link(model.output_layer.weight, ("lm_head.weight",), "vocab", 0))
        elif not model.pre_process:
            # Tied embeddings across pipeline stages: the last stage keeps its own copy of the embedding.
            links.append(_Link(model.output_layer.weight, ("model.embed_tokens.weight",), "vocab", 0))
    return links


def _read_shard(
    weights: HFWeights, link: _Link, groups: ParallelGroups, padded_vocab: int
) -> list[torch.Tensor]:
    """This TP rank's part of each HF tensor of ``link``."""
    tp, r = groups.tp_size, groups.tp_rank
    pieces = []
    for name in link.hf_names:
        if link.tp_dim is None:
            pieces.append(weights.read(name))
            continue
        if link.kind == "vocab":
            rows = padded_vocab // tp
            start, end = r * rows, (r + 1) * rows
            real = weights.shape(name)[0]
            part_VH = weights.read(name, 0, min(start, real), min(end, real))
            if part_VH.shape[0] < rows:  # padding rows: never predicted, zero like Megatron's own padding
                pad = part_VH.new_zeros(rows - part_VH.shape[0], *part_VH.shape[1:])
                part_VH = torch.cat([part_VH, pad])
            pieces.append(part_VH)
            continue
        size = weights.shape(name)[link.tp_dim] // tp
        pieces.append(weights.read(name, link.tp_dim, r * size, (r + 1) * size))
    return pieces


def _combine(link: _Link, pieces: list[torch.Tensor], cfg: ModelConfig, tp: int) -> torch.Tensor:
    if link.kind == "qkv":
        return fuse_qkv(*pieces, cfg.num_attention_heads // tp, cfg.query_groups // tp)
    if link.kind == "fc1":
        return torch.cat(pieces, dim=0)
    (piece,) = pieces
    return piece


def split_fused(
    link: _Link, full: torch.Tensor, cfg: ModelConfig, real_vocab: int
) -> tuple[torch.Tensor, ...]:
    """A TP=1 parameter -> its HF tensors (views), in ``link.hf_names`` order."""
    if link.kind == "qkv":
        return split_qkv(full, cfg.num_attention_heads, cfg.query_groups)
    if link.kind == "fc1":
        return tuple(full.chunk(2, dim=0))
    if link.kind == "vocab":
        return (full[:real_vocab],)
    return (full,)


# ----------------------------------------------------------------------------------------------------
# Import
# ----------------------------------------------------------------------------------------------------


def _check_layout(cfg: ModelConfig, groups: ParallelGroups) -> None:
    tp, pp, ep = groups.tp_size, groups.pp_size, groups.ep_size
    if ep > 1 and (cfg.num_experts is None or cfg.num_experts % ep):
        raise ConversionError(f"EP={ep} must divide the number of experts ({cfg.num_experts})")
    if cfg.num_attention_heads % tp or cfg.query_groups % tp:
        raise ConversionError(
            f"TP={tp} must divide the attention heads ({cfg.num_attention_heads}) and key/value heads "
            f"({cfg.query_groups})"
        )
    if cfg.num_layers % pp:
        raise ConversionError(f"PP={pp} must divide the number of layers ({cfg.num_layers})")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConversionError(
            f"output {out} exists and is not empty (--overwrite, or overwrite=True, replaces it)"
        )


def _prepare_output(out: Path, staging: Path, overwrite: bool) -> None:
    """A fresh staging directory beside ``out``; ``out`` itself is replaced only when all is written."""
    _check_output(out, overwrite)
    if staging.exists():  # leftover of a crashed conversion
        shutil.rmtree(staging)
    staging.mkdir(parents=True)


def _publish(staging: Path, out: Path) -> None:
    replace_dir(staging, out)


def hf_tokenizer_vocab_size(hf_dir: str | os.PathLike) -> int | None:
    """Token ids of the directory's ``tokenizer.json`` (added tokens included), or None without one."""
    path = Path(hf_dir) / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)
    except Exception as e:  # the tokenizers library raises its own exception type
        raise ConversionError(f"{path}: not a readable tokenizer ({e})") from None


def real_vocab_size(hf_dir: str | os.PathLike, embedding_rows: int) -> int:
    """The vocabulary a model of ``hf_dir`` can produce: its tokenizer's size when there is one (Qwen
    checkpoints carry more embedding rows than tokens), else every embedding row."""
    tok = hf_tokenizer_vocab_size(hf_dir)
    if tok is None:
        return embedding_rows
    if tok > embedding_rows:
        raise ConversionError(
            f"{Path(hf_dir) / 'tokenizer.json'}: {tok} tokens but config.json vocab_size={embedding_rows} "
            "embedding rows; the tokenizer does not belong to these weights"
        )
    return tok


def import_hf_checkpoint(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    groups: ParallelGroups,
    *,
    params_dtype: str | None = None,
    make_vocab_size_divisible_by: int = 16,
    overwrite: bool = False,
) -> Path:
    """Convert an HF Llama/Qwen2/Qwen3/Qwen3-MoE safetensors checkpoint into a checkpoint of this project.

    Collective: every rank of ``groups`` calls it. Each rank reads only its slices of the HF tensors
    into its own model stage (built without random init), so peak memory per process is about its share
    of the model plus one tensor and the save's ``linear_fc1`` clones. ``params_dtype`` defaults to the dtype in ``config.json``. Returns the checkpoint directory
    (``out_dir/step_0000000``), which ``train.init_checkpoint`` and teacher ``checkpoint`` accept, as
    does ``out_dir`` itself.
    """
    from opd_megatron.models.checkpoint import save_checkpoint
    from opd_megatron.models.gpt import build_gpt_model

    hf_dir, out = Path(hf_dir), Path(out_dir)
    hf_cfg = read_hf_config(hf_dir)
    weights = HFWeights(hf_dir)
    if params_dtype is None and not (hf_cfg.get("dtype") or hf_cfg.get("torch_dtype")):
        # No dtype in config.json: keep the one the weights are stored in.
        params_dtype = (
            _DTYPE_CODES.get(weights.dtype_code(weights.names()[0]), "fp32") if weights.names() else None
        )
    arch, cfg = model_config_from_hf(
        hf_cfg, params_dtype=params_dtype, make_vocab_size_divisible_by=make_vocab_size_divisible_by
    )
    validate_hf_weights(weights, cfg)
    _check_layout(cfg, groups)
    real_vocab = real_vocab_size(hf_dir, cfg.vocab_size)
    _check_output(out, overwrite)  # on every rank, so that all of them stop, not only rank 0
    staging = out.parent / f".{out.name}.partial"
    if _is_main():
        _prepare_output(out, staging, overwrite)
    _barrier()

    # No random init: every parameter is overwritten below, and init would hold an fp32 copy of each
    # weight at once (about twice a bf16 model's memory at the peak).
    # Every embedding row is kept (all_rows) so that export gives identical tensors back; the checkpoint
    # records the tokenizer's size as its real vocabulary, and models built for training drop the rest.
    model = build_gpt_model(cfg, groups, real_vocab, initialize=False, all_rows=True)
    filled: set[int] = set()
    with torch.no_grad():
        for link in tensor_links(model, cfg, groups.ep_rank, groups.ep_size):
            pieces = _read_shard(weights, link, groups, model.padded_vocab_size)
            local = _combine(link, pieces, cfg, groups.tp_size)
            if local.shape != link.param.shape:
                raise AssertionError(
                    f"{link.hf_names}: built {tuple(local.shape)}, model has {tuple(link.param.shape)}"
                )
            link.param.copy_(local)
            filled.add(id(link.param))
            del pieces, local
    unfilled = [n for n, p in model.named_parameters() if id(p) not in filled]
    if unfilled:  # an uninitialised parameter must never reach a checkpoint
        raise AssertionError(f"no HF tensor maps to {', '.join(unfilled)}")

    side = [n for n in HF_SIDE_FILES if (hf_dir / n).is_file()]
    final = out / "step_0000000"
    tokenizer = TokenizerConfig()
    if "tokenizer.json" in side:
        # Where the file will live once the conversion is published (configs hold plain paths).
        tokenizer = TokenizerConfig(kind="hf", path=str((final / HF_SIDE_DIR / "tokenizer.json").resolve()))
    run_cfg = RunConfig(
        name=f"{hf_dir.name}",
        model=cfg,
        tokenizer=tokenizer,
        parallel=ParallelConfig(
            tensor_model_parallel_size=groups.tp_size,
            pipeline_model_parallel_size=groups.pp_size,
            expert_model_parallel_size=groups.ep_size,
        ),
    )
    saved = save_checkpoint(staging, 0, model, groups, config=run_cfg, keep_last=1)
    del model
    if _is_main():
        copy_files(hf_dir, saved / HF_SIDE_DIR, side)
        _publish(staging, out)
    _barrier()
    return final


# ----------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------


def _export_plan(model, cfg: ModelConfig, real_vocab: int, dtype: torch.dtype) -> list[PlannedTensor]:
    """``real_vocab`` here is the number of embedding rows written (the checkpoint's row count)."""
    producers: dict[str, Callable[[], torch.Tensor]] = {}
    for link in tensor_links(model, cfg):
        for j, name in enumerate(link.hf_names):
            # Bind link and j now; each producer builds its tensor only when the writer asks for it.
            def produce(link=link, j=j) -> torch.Tensor:
                return split_fused(link, link.param.detach(), cfg, real_vocab)[j].to(dtype).contiguous()

            producers.setdefault(name, produce)
    shapes = hf_tensor_shapes(cfg, real_vocab)
    assert set(shapes) == set(producers), sorted(set(shapes) ^ set(producers))
    return [PlannedTensor(name, shape, dtype, producers[name]) for name, shape in shapes.items()]


def export_hf_checkpoint(
    ckpt: str | os.PathLike,
    out_dir: str | os.PathLike,
    groups: ParallelGroups,
    *,
    dtype: str | None = None,
    max_shard_size: str | int = "5GB",
    architecture: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a checkpoint of this project (saved at any TP/PP) as an HF safetensors model directory.

    Runs at TP=1/PP=1 (any extra data-parallel ranks take part in the collective load; rank 0 writes).
    ``dtype`` defaults to the checkpoint's; ``architecture`` to the one the checkpoint was imported from,
    else the one whose layers the model has (:func:`default_architecture`). Returns ``out_dir``.
    """
    from opd_megatron.models.checkpoint import read_config, read_meta, resolve_checkpoint
    from opd_megatron.models.gpt import build_gpt_model

    if groups.tp_size != 1 or groups.pp_size != 1 or groups.ep_size != 1:
        raise ConversionError(
            f"export runs at TP=1, PP=1 and EP=1 (got TP={groups.tp_size}, PP={groups.pp_size}, "
            f"EP={groups.ep_size}); the checkpoint "
            "reshards on load, whatever layout saved it"
        )
    ckpt, out = resolve_checkpoint(ckpt), Path(out_dir)
    cfg = read_config(ckpt).model
    real_vocab = read_meta(ckpt).get("real_vocab_size") or cfg.vocab_size
    rows = max(cfg.vocab_size or 0, real_vocab)  # rows the checkpoint may hold beyond the tokenizer
    base_path = ckpt / HF_SIDE_DIR / "config.json"
    base = json.loads(base_path.read_text()) if base_path.is_file() else None
    if architecture is None:
        architecture = architecture_for(base) if base is not None else default_architecture(cfg)
    out_dtype = _TORCH_DTYPES[dtype or cfg.params_dtype]
    hf_cfg = hf_config_from_model_config(cfg, rows, architecture, out_dtype, base)

    try:
        max_bytes = parse_size(max_shard_size)
    except ValueError as e:
        raise ConversionError(f"max_shard_size: {e}") from None
    _check_output(out, overwrite)  # fail before the (long) load, not after it

    model = build_gpt_model(cfg, groups, real_vocab, frozen=True, initialize=False, all_rows=True)
    _load_weights(ckpt, model)
    if _is_main():
        staging = out.parent / f".{out.name}.partial"
        _prepare_output(out, staging, overwrite)
        write_sharded(staging, _export_plan(model, cfg, rows, out_dtype), max_bytes)
        side = [n for n in HF_SIDE_FILES if n != "config.json"]
        copy_files(ckpt / HF_SIDE_DIR, staging, side)
        (staging / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
        _publish(staging, out)
    _barrier()
    return out


def _load_weights(ckpt: Path, model) -> None:
    from opd_megatron.models.checkpoint import load_model_weights

    load_model_weights(ckpt, model)


# ----------------------------------------------------------------------------------------------------
# Command line (``opd-megatron convert`` and tools/convert_*.py)
# ----------------------------------------------------------------------------------------------------


def add_hf_to_megatron_args(p) -> None:
    p.add_argument("hf_dir", help="Hugging Face model directory (config.json + safetensors)")
    p.add_argument("output", help="output directory for the Megatron checkpoint")
    p.add_argument(
        "--tp", type=int, default=1, help="tensor-parallel size to convert at (launch TP*PP ranks)"
    )
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to convert at")
    p.add_argument(
        "--ep",
        type=int,
        default=1,
        help="expert-parallel size to convert an MoE model at (spreads its experts)",
    )
    p.add_argument(
        "--dtype", choices=sorted(_TORCH_DTYPES), default=None, help="parameter dtype (default: the HF one)"
    )
    p.add_argument(
        "--make-vocab-size-divisible-by",
        type=int,
        default=16,
        help="pad the vocabulary to a multiple of this * TP",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")


def add_megatron_to_hf_args(p) -> None:
    p.add_argument("checkpoint", help="checkpoint directory (or a root of step_* directories: latest wins)")
    p.add_argument("output", help="output Hugging Face model directory")
    p.add_argument(
        "--dtype",
        choices=sorted(_TORCH_DTYPES),
        default=None,
        help="output dtype (default: the checkpoint's)",
    )
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (e.g. 5GB, 500MB)")
    p.add_argument(
        "--architecture",
        choices=sorted(SUPPORTED_ARCHITECTURES),
        default=None,
        help="HF model class (default: the imported one, else by QKV bias)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")


def add_convert_parser(subparsers) -> None:
    """Register ``convert hf-to-megatron`` and ``convert megatron-to-hf`` on a CLI's subparsers."""
    p = subparsers.add_parser("convert", help="convert checkpoints between Hugging Face and Megatron formats")
    sub = p.add_subparsers(dest="direction", required=True)
    a = sub.add_parser(
        "hf-to-megatron",
        help="HF Llama/Qwen2/Qwen3/Qwen3-MoE safetensors -> Megatron distributed checkpoint",
        description="Under torchrun with TP*PP ranks it converts at --tp/--pp; the result loads at any TP/PP.",
    )
    add_hf_to_megatron_args(a)
    a.set_defaults(func=run_convert)
    b = sub.add_parser("megatron-to-hf", help="Megatron checkpoint (any TP/PP) -> HF safetensors")
    add_megatron_to_hf_args(b)
    b.set_defaults(func=run_convert)


def run_convert(args) -> int:
    """Run one conversion from parsed arguments; returns the process exit status."""
    import sys

    from opd_megatron.distributed import destroy_distributed, init_distributed

    tp, pp, ep = (args.tp, args.pp, args.ep) if args.direction == "hf-to-megatron" else (1, 1, 1)
    if args.direction == "hf-to-megatron":
        try:  # a config this converter cannot handle fails here, before any distributed start-up
            model_config_from_hf(read_hf_config(args.hf_dir))
        except ConversionError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % (tp * pp * ep):
        print(
            f"error: converting at TP={tp} PP={pp} EP={ep} needs a multiple of {tp * pp * ep} processes (got "
            f"{world}): launch with torchrun --nproc-per-node {tp * pp * ep}, or convert at TP=1 PP=1 EP=1 (the "
            "checkpoint reshards on load)",
            file=sys.stderr,
        )
        return 2
    try:
        groups = init_distributed(
            ParallelConfig(
                tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep
            )
        )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        if args.direction == "hf-to-megatron":
            result = import_hf_checkpoint(
                args.hf_dir,
                args.output,
                groups,
                params_dtype=args.dtype,
                make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                overwrite=args.overwrite,
            )
        else:
            result = export_hf_checkpoint(
                args.checkpoint,
                args.output,
                groups,
                dtype=args.dtype,
                max_shard_size=args.max_shard_size,
                architecture=args.architecture,
                overwrite=args.overwrite,
            )
    except (ConversionError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        main = _is_main()
        destroy_distributed()
    if main:
        print(f"wrote {result} in {time.perf_counter() - t0:.1f}s")
    return 0
