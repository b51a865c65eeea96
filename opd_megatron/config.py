"""One typed configuration tree for every opd_megatron job.

A run is a :class:`RunConfig`: nested dataclasses, each field documented where it is declared. Configs
come from Python (``examples/*.py`` return a ``RunConfig``), from YAML, and from dotted command-line
overrides (``train.lr=3e-4``). Every user mistake raises :class:`ConfigError`, which names the field
path, the bad value and what is allowed; unknown keys get a did-you-mean suggestion.

Validation of a single section lives in its ``__post_init__`` and reports the field name relative to
that section; :func:`from_dict` prefixes the path of the section, so the user always sees the full path
(``parallel.tensor_model_parallel_size``). Every section first checks that none of its numbers is NaN or
infinite (:func:`_check_fields`), whichever way the config was built.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

__all__ = [
    "ConfigError",
    "ModelConfig",
    "TokenizerConfig",
    "ParallelConfig",
    "TeacherConfig",
    "MOPDConfig",
    "LossConfig",
    "RolloutConfig",
    "TrainConfig",
    "DataConfig",
    "LaunchConfig",
    "RunConfig",
    "from_dict",
    "to_dict",
    "load_config",
    "apply_overrides",
]


class ConfigError(ValueError):
    """A user-facing configuration error that names the offending field path."""

    def __init__(self, path: str, message: str):
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)

    def with_prefix(self, prefix: str) -> ConfigError:
        if not prefix:
            return self
        return ConfigError(f"{prefix}.{self.path}" if self.path else prefix, self.message)


def _check(cond: bool, path: str, message: str) -> None:
    if not cond:
        raise ConfigError(path, message)


def _one_of(value: Any, allowed: tuple, path: str) -> None:
    _check(value in allowed, path, f"got {value!r}; allowed: {', '.join(map(repr, allowed))}")


_LITERALS: dict[type, dict[str, tuple]] = {}


def _check_literals(obj: Any) -> None:
    """Check every ``Literal[...]`` field of a config section (also ``Literal[...] | None``), so a
    section built in Python is held to what YAML loading enforces."""
    cls = type(obj)
    if cls not in _LITERALS:
        allowed = {}
        for name, tp in typing.get_type_hints(cls).items():
            args = typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)
            lits = [a for a in args if typing.get_origin(a) is Literal]
            if lits:
                other = tuple(
                    a for a in args if a is not type(None) and a not in lits and isinstance(a, type)
                )
                allowed[name] = (typing.get_args(lits[0]) + ((None,) if type(None) in args else ()), other)
        _LITERALS[cls] = allowed
    for name, (options, other) in _LITERALS[cls].items():
        value = getattr(obj, name)
        if not (other and isinstance(value, other)):  # e.g. ``bool | Literal["force"]``
            also = f", or a {' or '.join(t.__name__ for t in other)}" if other else ""
            _check(value in options, name, f"got {value!r}; allowed: {', '.join(map(repr, options))}{also}")


def _finite(value: float, path: str) -> None:
    _check(math.isfinite(value), path, f"must be a finite number, got {value!r}")


def _check_finite_values(value: Any, path: str) -> None:
    """Every float in ``value`` (a field's value; lists and mappings searched) is finite; nested config
    sections check their own."""
    if isinstance(value, float):
        _finite(value, path)
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_finite_values(v, f"{path}.{k}")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_finite_values(v, f"{path}[{i}]")


def _check_fields(obj: Any) -> None:
    """The checks every config section runs first: no field holds NaN or an infinity (a float field, or a
    float inside a list or mapping field), and every ``Literal`` field holds one of its values."""
    for f in dataclasses.fields(obj):
        _check_finite_values(getattr(obj, f.name), f.name)
    _check_literals(obj)


# ----------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------


@dataclass
class TokenizerConfig:
    """Which tokenizer a model uses. Built-in domains use the character tokenizer; other kinds load
    locally trained files (no hub downloads)."""

    kind: Literal["char", "sentencepiece", "tiktoken", "hf"] = "char"
    """``char``: the built-in character tokenizer of the synthetic domains; ``sentencepiece``: a
    ``.model`` file; ``tiktoken``: a mergeable-ranks file; ``hf``: a Hugging Face ``tokenizer.json``."""
    path: str | None = None
    """Tokenizer file for the non-``char`` kinds."""
    chat_template: str = "plain"
    """``model``: the model's own Jinja chat template (``kind: hf`` with ``path`` a Hugging Face tokenizer
    directory holding ``tokenizer_config.json`` / ``chat_template.jinja``), rendered by ``transformers``;
    else the name of a hand-written template for the built-in toy tokenizers (``plain``, ``chatml``,
    ``llama3``, ``glm``). A tokenizer taken from a Hugging Face model directory (an HF
    ``train.init_checkpoint`` without ``tokenizer.path``) defaults to ``model`` when the directory has a
    Jinja template."""
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra variables for the model's Jinja template, e.g. ``{enable_thinking: false}`` for Qwen3."""

    def __post_init__(self):
        _check_fields(self)
        _check(
            self.chat_template != "model" or self.kind == "hf",
            "chat_template",
            f"'model' (the model's own Jinja template) needs kind 'hf' with a tokenizer directory, got kind {self.kind!r}",
        )
        if self.template_kwargs:
            _check(
                self.chat_template == "model",
                "template_kwargs",
                f"only the model's own Jinja template takes variables (chat_template: model), not {self.chat_template!r}",
            )
        _check(
            self.kind == "char" or bool(self.path), "path", f"tokenizer kind {self.kind!r} needs a file path"
        )


@dataclass
class ModelConfig:
    """Architecture of a Llama-style Megatron GPTModel (RMSNorm, SwiGLU, RoPE, GQA)."""

    num_layers: int = 2
    """Transformer layers; must be divisible by the pipeline-parallel size."""
    hidden_size: int = 128
    num_attention_heads: int = 4
    """Query heads; must be divisible by the tensor-parallel size."""
    head_dim: int | None = None
    """Size of one attention head (Megatron's ``kv_channels``); ``None``: ``hidden_size /
    num_attention_heads``. Qwen3 sets it explicitly (e.g. 128 with hidden 2048 and 16 heads)."""
    qk_layernorm: bool = False
    """Per-head RMSNorm on queries and keys before RoPE (Qwen3)."""
    num_query_groups: int | None = None
    """Key/value heads for grouped-query attention; ``None`` means one per query head (MHA)."""
    ffn_hidden_size: int | None = None
    """SwiGLU inner size; ``None`` gives Llama's ``round_up(8/3 * hidden, 16)``."""
    vocab_size: int | None = None
    """Real vocabulary size; ``None`` takes it from the tokenizer. Padded to a TP-divisible size."""
    make_vocab_size_divisible_by: int = 16
    """Pad the embedding to a multiple of lcm(this, TP size); padding rows are never predicted. With a
    power-of-two TP up to this value the padded size, and so the checkpoint layout, is TP-independent."""
    max_sequence_length: int = 128
    rotary_base: float = 10000.0
    rope_scaling: Literal["none", "linear", "llama3", "yarn"] = "none"
    """RoPE frequency scaling: ``linear`` divides every frequency by ``rope_scaling_factor`` (position
    interpolation); ``llama3`` is Llama-3.1's banded rescaling (``rope_scaling_factor``,
    ``rope_low_freq_factor``, ``rope_high_freq_factor``, ``rope_original_max_position``); ``yarn`` is
    YaRN (``rope_scaling_factor``, ``rope_original_max_position``, ``rope_yarn_*``): frequencies blended
    between interpolated and original by a ramp over the rotation counts ``beta_slow .. beta_fast``, and
    cos/sin multiplied by an attention factor (Megatron-core's ``YarnRotaryEmbedding``)."""
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    """``llama3``: wavelengths above ``rope_original_max_position / this`` are divided by the factor."""
    rope_high_freq_factor: float = 4.0
    """``llama3``: wavelengths below ``rope_original_max_position / this`` are kept."""
    rope_original_max_position: int = 8192
    """``llama3``, ``yarn``: the context length the model was pre-trained at."""
    rope_yarn_beta_fast: float = 32.0
    """``yarn``: dimensions that rotate more than this often over the original context keep their
    frequency (transformers' ``beta_fast``)."""
    rope_yarn_beta_slow: float = 1.0
    """``yarn``: dimensions that rotate less than this often are interpolated (``beta_slow``)."""
    rope_yarn_mscale: float | None = None
    """``yarn``: with ``rope_yarn_mscale_all_dim`` (both non-zero), the attention factor is
    ``m(factor, mscale) / m(factor, mscale_all_dim)``, ``m(s, k) = 0.1 k ln s + 1``; otherwise
    ``m(factor, 1)`` (transformers' rule)."""
    rope_yarn_mscale_all_dim: float | None = None
    tie_embeddings: bool = True
    """Share the input embedding and the output layer."""
    add_qkv_bias: bool = False
    """Bias on the fused QKV projection (Qwen2 family)."""
    norm_epsilon: float = 1e-5
    num_experts: int | None = None
    """Mixture of experts: routed experts per layer (every layer is an MoE layer); ``None``: dense MLP."""
    moe_router_topk: int = 2
    """Experts each token is sent to."""
    moe_ffn_hidden_size: int | None = None
    """SwiGLU inner size of one expert; ``None``: ``ffn_hidden_size``."""
    moe_norm_topk_prob: bool = True
    """Renormalise the top-k routing probabilities to sum to 1 (Qwen3-MoE's ``norm_topk_prob``); False
    keeps the softmax over all experts."""
    moe_aux_loss_coeff: float = 0.0
    """Weight of Megatron's load-balancing auxiliary loss (0: none)."""
    init_method_std: float = 0.02
    params_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    """``auto``: Transformer Engine when CUDA and TE are importable, else the local spec with SDPA."""
    fp8: Literal["e4m3", "hybrid"] | None = None
    """FP8 training through Transformer Engine's delayed-scaling recipe; needs CUDA and TE."""

    def __post_init__(self):
        _check_fields(self)
        for name in ("num_layers", "hidden_size", "num_attention_heads", "max_sequence_length"):
            _check(
                int(getattr(self, name)) > 0, name, f"must be a positive integer, got {getattr(self, name)!r}"
            )
        if self.head_dim is None:
            _check(
                self.hidden_size % self.num_attention_heads == 0,
                "hidden_size",
                f"{self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads} "
                "(set head_dim for a head size other than hidden_size / num_attention_heads)",
            )
        else:
            _check(self.head_dim > 0, "head_dim", f"must be a positive integer, got {self.head_dim!r}")
        for name in ("norm_epsilon", "init_method_std", "rotary_base"):
            _check(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        if self.rope_scaling != "none":
            _check(
                self.rope_scaling_factor >= 1.0,
                "rope_scaling_factor",
                f"must be >= 1 with rope_scaling={self.rope_scaling!r}, got {self.rope_scaling_factor}",
            )
        if self.rope_scaling == "llama3":
            _check(
                0 < self.rope_low_freq_factor < self.rope_high_freq_factor,
                "rope_low_freq_factor",
                f"must be in (0, rope_high_freq_factor={self.rope_high_freq_factor}), "
                f"got {self.rope_low_freq_factor}",
            )
            _check(self.rope_original_max_position > 0, "rope_original_max_position", "must be > 0")
        if self.rope_scaling == "yarn":
            _check(self.rope_original_max_position > 0, "rope_original_max_position", "must be > 0")
            _check(
                self.rope_yarn_beta_fast > self.rope_yarn_beta_slow > 0,
                "rope_yarn_beta_slow",
                f"must be in (0, rope_yarn_beta_fast={self.rope_yarn_beta_fast}), got {self.rope_yarn_beta_slow}",
            )
        if self.num_experts is not None:
            _check(self.num_experts >= 1, "num_experts", f"must be >= 1, got {self.num_experts}")
            _check(
                1 <= self.moe_router_topk <= self.num_experts,
                "moe_router_topk",
                f"must be in [1, num_experts={self.num_experts}], got {self.moe_router_topk}",
            )
            _check(self.moe_aux_loss_coeff >= 0, "moe_aux_loss_coeff", "must be >= 0")
        if self.moe_ffn_hidden_size is not None:
            _check(self.moe_ffn_hidden_size > 0, "moe_ffn_hidden_size", "must be > 0")
        if self.num_query_groups is not None:
            _check(
                self.num_query_groups > 0 and self.num_attention_heads % self.num_query_groups == 0,
                "num_query_groups",
                f"{self.num_query_groups} must divide num_attention_heads={self.num_attention_heads}",
            )
        if self.vocab_size is not None:
            _check(self.vocab_size > 0, "vocab_size", f"must be positive, got {self.vocab_size}")

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        return int(-(-(8 * self.hidden_size // 3) // 16) * 16)

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def kv_channels(self) -> int:
        """Size of one attention head."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def expert_ffn_size(self) -> int:
        return self.moe_ffn_hidden_size or self.ffn_size


@dataclass
class ParallelConfig:
    """Model parallel sizes. Data parallel is whatever remains of the world size."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    """Mixture-of-experts models: the experts of each layer are split over this many ranks. It must
    divide ``model.num_experts`` and the data-parallel size (Megatron forms expert groups out of the
    data-parallel ranks; attention stays data-parallel across them)."""
    sequence_parallel: bool = False
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """``auto``: nccl when CUDA is available, else gloo."""
    timeout_s: int = 600
    """Collective timeout; a hang fails after this long instead of stalling forever."""

    def __post_init__(self):
        _check_fields(self)
        _check(self.tensor_model_parallel_size >= 1, "tensor_model_parallel_size", "must be >= 1")
        _check(self.pipeline_model_parallel_size >= 1, "pipeline_model_parallel_size", "must be >= 1")
        _check(self.expert_model_parallel_size >= 1, "expert_model_parallel_size", "must be >= 1")

    @property
    def tp(self) -> int:
        return self.tensor_model_parallel_size

    @property
    def pp(self) -> int:
        return self.pipeline_model_parallel_size


@dataclass
class TeacherConfig:
    """One teacher of an OPD / MOPD run."""

    name: str = "teacher"
    checkpoint: str | None = None
    """Checkpoint directory (a Megatron distributed checkpoint written by this project)."""
    placement: Literal["colocated", "remote", "self", "vllm"] = "colocated"
    """``colocated``: in-process Megatron model; ``remote``: scored over HTTP at ``url``; ``self``: the
    student's own weights (self-distillation); ``vllm``: an in-process vLLM engine loaded from the HF
    model directory ``checkpoint`` returns top-k prompt log-probs (the sparse top-k loss path)."""
    url: str | None = None
    domains: list[str] = field(default_factory=list)
    """Domains this teacher covers under specialty routing; empty means none in particular."""
    weight: float = 1.0
    """Mixture weight when teachers are mixed."""
    tensor_model_parallel_size: int | None = None
    """Teacher TP size (must divide the student's); ``None`` uses the student's."""
    tokenizer: TokenizerConfig | None = None
    """Teacher tokenizer when it differs from the student's (cross-tokeniser OPD)."""
    dtype: Literal["fp32", "bf16"] = "fp32"
    offload_when_idle: bool = False
    """Co-located on CUDA: keep the teacher's weights in host memory between scoring calls (moved to the
    GPU for each call), trading transfer time for GPU memory. On CPU the weights already live there."""
    token_env: str | None = None
    """Remote: name of the environment variable holding the service's bearer token (never the token)."""
    timeout_s: float = 60.0
    """Remote: socket timeout of one request attempt."""
    retries: int = 3
    """Remote: attempts after the first before the step is aborted with this teacher's name."""
    self_mode: Literal["frozen", "ema", "refresh"] = "frozen"
    """For ``placement: self``: frozen snapshot, EMA of the student, or periodic refresh."""
    ema_rate: float = 0.99
    refresh_every: int = 50
    privileged_source: Literal["reference", "privileged"] = "reference"
    """For ``placement: self``: the hint the teacher sees before the prompt (the row's field)."""
    vllm_kv_cache_mb: float = 256.0
    """For ``placement: vllm``: the engine's KV-cache memory."""

    def __post_init__(self):
        _check_fields(self)
        _check(bool(self.name), "name", "a teacher needs a non-empty name")
        if self.placement == "vllm":
            _check(
                bool(self.checkpoint),
                "checkpoint",
                f"teacher {self.name!r} runs on vLLM and needs checkpoint: a Hugging Face model directory",
            )
        _check(self.vllm_kv_cache_mb > 0, "vllm_kv_cache_mb", f"must be > 0, got {self.vllm_kv_cache_mb}")
        if self.placement == "remote":
            _check(bool(self.url), "url", f"teacher {self.name!r} is remote and needs a url")
        if self.placement == "colocated":
            _check(
                bool(self.checkpoint),
                "checkpoint",
                f"teacher {self.name!r} is colocated and needs a checkpoint",
            )
        _check(self.weight >= 0, "weight", f"must be >= 0, got {self.weight}")
        _check(0.0 <= self.ema_rate < 1.0, "ema_rate", f"must be in [0, 1), got {self.ema_rate}")
        _check(self.timeout_s > 0, "timeout_s", f"must be > 0, got {self.timeout_s}")
        _check(self.retries >= 0, "retries", f"must be >= 0, got {self.retries}")


DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tv")

SAMPLED_OBJECTIVES = ("tinker", "minillm", "gopd", "aopd", "rlsd")
"""Objectives on the sampled tokens only (a policy gradient on the teacher/student log-ratio)."""
OBJECTIVES = ("divergence", "opsd", *SAMPLED_OBJECTIVES)
"""Every ``loss.objective``: the full-distribution ones (``divergence``; ``opsd``, the same with a
per-token clip) and the sampled-token ones. The one registry of objective names."""


@dataclass
class LossConfig:
    """The distillation objective."""

    divergence: str = "reverse_kl"
    """Per-token divergence D(teacher, student): one of forward_kl, reverse_kl, jsd, skew_forward_kl,
    skew_reverse_kl, tv."""
    jsd_beta: float = 0.5
    """Generalized JSD weight; beta=0 is forward KL(T||S), beta=1 is reverse KL(S||T) (see losses)."""
    skew_alpha: float = 0.1
    """DistiLLM skew: the second KL argument is alpha*p + (1-alpha)*q."""
    temperature: float = 1.0
    """Applied to both teacher and student logits; the sampler uses the same value."""
    scale_by_t2: bool = False
    """Multiply the loss by T^2 (Hinton) so gradient size does not shrink with T."""
    chunk_size: int = 1024
    """Tokens per chunk in the fused vocab-parallel loss."""
    compile_block: Literal["auto", "always", "never"] = "auto"
    """Fused loss on one CPU process: run each row block's softmax and divergence work as one
    ``torch.compile``-d function (about half the eager time at large vocabularies, after seconds of
    compiling per setting). ``auto``: at a vocabulary of 16384 or more in fp32, eager if compiling
    fails; ``always``: compile errors stop the run; ``never``: eager. No effect on GPU or under TP."""
    objective: str = "divergence"
    """One of :data:`OBJECTIVES`: ``divergence``, the full-vocab fused divergence; ``opsd``, the same
    with a per-token clip; or a sampled-token objective (:data:`SAMPLED_OBJECTIVES`)."""
    topk: int = 20
    """k of the sparse top-k targets remote teachers return (their loss uses the top-k path)."""
    topk_tail: Literal["renorm", "rest"] = "renorm"
    """Tail mass of the top-k path: renormalise over the k tokens, or keep a "rest" bucket."""
    cross_kl: Literal["projected", "shared"] = "projected"
    """Cross-tokeniser teachers, at positions where both sides condition on the same text (each alignment
    group's first student token): ``projected``: ``divergence`` against the teacher's distribution moved
    onto the student's vocabulary by first-token projection (a teacher token counts for the student token
    its text starts with), ULD at the other positions; ``shared``: the hybrid generalised KL on the exact
    vocabulary intersection plus ULD on the rest at 1:1-aligned positions, ULD elsewhere."""
    uld_metric: Literal["l1", "w1"] = "l1"
    """Cross-tokeniser teachers: distance of the ULD fallback on sorted probabilities."""
    cross_kl_weight: float = 1.0
    """Cross-tokeniser teachers: weight of the KL on the shared vocabulary at boundary-aligned positions."""
    uld_weight: float = 1.0
    """Cross-tokeniser teachers: weight of the ULD term (rest of the vocabulary, and unaligned positions)."""
    on_policy_lambda: float = 1.0
    """GKD lambda: share of each batch whose completions the student samples itself; the rest are
    off-policy sequences (``off_policy_source``). 0 is supervised KD, 1 fully on-policy."""
    lambda_schedule: Literal["constant", "linear"] = "constant"
    """``linear``: DistiLLM-style adaptive schedule, lambda ramps from ``lambda_start`` to
    ``on_policy_lambda`` over ``lambda_ramp_steps`` (off-policy first, student rollouts later)."""
    lambda_start: float = 0.0
    lambda_ramp_steps: int = 100
    off_policy_source: Literal["dataset", "teacher"] = "dataset"
    """Off-policy completions: the row's ``reference`` or a teacher-sampled completion."""
    mix_alpha: float = 0.0
    """MiniLLM teacher-mixed sampling: tokens come from alpha*p_T + (1-alpha)*q_S, and each token's loss
    is weighted by the importance weight q_S / p_mix."""
    discount: float = 0.0
    """Suffix discount for the sampled-token objectives (tinker, gopd; MiniLLM uses 1)."""
    gopd_lambda: float = 1.0
    """G-OPD reward scale against the reference model (the starting student); > 1 extrapolates."""
    aopd_topk: int = 8
    """AOPD: teacher top-K for the forward-KL branch."""
    opsd_tau: float = 0.0
    """OPSD per-token clip of the divergence (0 disables)."""
    rlsd_eps: float = 0.2
    """RLSD evidence-weight clip."""

    def __post_init__(self):
        _check_fields(self)
        _one_of(self.divergence, DIVERGENCES, "divergence")
        _one_of(self.objective, OBJECTIVES, "objective")
        for name in ("on_policy_lambda", "lambda_start", "mix_alpha"):
            v = getattr(self, name)
            _check(0.0 <= v <= 1.0, name, f"must be in [0, 1], got {v}")
        _check(self.lambda_ramp_steps >= 1, "lambda_ramp_steps", "must be >= 1")
        _check(0.0 <= self.discount <= 1.0, "discount", f"must be in [0, 1], got {self.discount}")
        _check(self.gopd_lambda > 0, "gopd_lambda", f"must be > 0, got {self.gopd_lambda}")
        _check(self.aopd_topk >= 1, "aopd_topk", "must be >= 1")
        _check(self.opsd_tau >= 0, "opsd_tau", "must be >= 0")
        _check(self.rlsd_eps >= 0, "rlsd_eps", f"must be >= 0, got {self.rlsd_eps}")
        _check(0.0 <= self.jsd_beta <= 1.0, "jsd_beta", f"must be in [0, 1], got {self.jsd_beta}")
        _check(0.0 <= self.skew_alpha < 1.0, "skew_alpha", f"must be in [0, 1), got {self.skew_alpha}")
        _check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        _check(self.chunk_size > 0, "chunk_size", f"must be > 0, got {self.chunk_size}")
        _check(self.topk >= 1, "topk", f"must be >= 1, got {self.topk}")
        for name in ("cross_kl_weight", "uld_weight"):
            _check(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")


@dataclass
class RolloutConfig:
    """Student sampling."""

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0 disables top-k filtering."""
    stop: list[str] = field(default_factory=list)
    samples_per_prompt: int = 1
    """Completions sampled per prompt, in one generate call. They count in the batch: each data-parallel
    rank takes ``train.micro_batch_size * train.grad_accumulation / samples_per_prompt`` prompts per
    step. With more than one, each step logs ``pass@n``: the share of prompts (of verifiable domains)
    with at least one correct on-policy sample."""
    engine: Literal["megatron", "vllm"] = "megatron"
    """``megatron``: the KV-cache sampler on the trainer's own model; ``vllm``: a vLLM engine holding a
    copy of the student, refitted after every optimizer step (``opd_megatron.rollout.vllm_engine``)."""
    lean_decode: bool = True
    """``megatron`` engine: decode the dense local-spec layers through the lean path
    (``opd_megatron.rollout.lean_decode``: the same maths on the model's parameters without Megatron's
    module machinery, several times less per-token overhead); ``false`` keeps Megatron-core's forward.
    Models it does not cover (MoE, the Transformer Engine spec, ...) always use Megatron's forward."""
    vllm_kv_cache_mb: float = 256.0
    """``engine: vllm``: the engine's KV-cache memory; it must hold one ``model.max_sequence_length``
    sequence or the run stops before training."""
    vllm_max_num_seqs: int = 64
    """``engine: vllm``: most sequences the engine decodes together."""
    vllm_placement: Literal["colocated", "separate"] = "colocated"
    """``engine: vllm``: ``colocated``: the engine runs with rank 0 of each data-parallel replica, on its
    device (the only choice on CPU; on GPU the engine sleeps while the trainer works and is refitted
    through CUDA IPC). ``separate`` (GPU only): each replica's engine on a GPU of its own
    (``vllm_devices``), refitted over NCCL. The GPU paths are not verified by a GPU run here."""
    vllm_devices: list[int] = field(default_factory=list)
    """``vllm_placement: separate``: physical GPU index of each data-parallel replica's engine (one per
    replica, none of them a trainer's GPU)."""
    tis: Literal["auto", "on", "off"] = "auto"
    """Truncated importance sampling against the rollout/trainer mismatch: ``auto`` is on for the
    sampled-token objectives and off for the full-distribution ``divergence`` (where it does not apply)."""
    tis_cap: float = 2.0
    """Cap C of the truncated importance weight ``min(pi / mu, C)``."""

    def __post_init__(self):
        _check_fields(self)
        _check(self.vllm_kv_cache_mb > 0, "vllm_kv_cache_mb", f"must be > 0, got {self.vllm_kv_cache_mb}")
        _check(
            self.vllm_max_num_seqs >= 1, "vllm_max_num_seqs", f"must be >= 1, got {self.vllm_max_num_seqs}"
        )
        _check(self.tis_cap >= 1.0, "tis_cap", f"must be >= 1, got {self.tis_cap}")
        _check(
            all(isinstance(d, int) and d >= 0 for d in self.vllm_devices),
            "vllm_devices",
            f"must be GPU indices (integers >= 0), got {self.vllm_devices}",
        )
        _check(
            self.vllm_placement != "separate" or self.vllm_devices,
            "vllm_devices",
            "vllm_placement=separate needs the GPU of each data-parallel replica's engine",
        )
        _check(self.max_new_tokens > 0, "max_new_tokens", f"must be > 0, got {self.max_new_tokens}")
        _check(self.temperature >= 0, "temperature", f"must be >= 0 (0 is greedy), got {self.temperature}")
        _check(0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p}")
        _check(self.top_k >= 0, "top_k", f"must be >= 0, got {self.top_k}")
        _check(self.samples_per_prompt >= 1, "samples_per_prompt", "must be >= 1")


@dataclass
class TrainConfig:
    """Optimisation, evaluation and checkpointing."""

    steps: int = 200
    micro_batch_size: int = 16
    """Sequences per forward/backward on one data-parallel rank."""
    grad_accumulation: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 1e-3
    min_lr: float = 1e-4
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 10
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    seed: int = 1234
    eval_every: int = 50
    eval_samples: int = 64
    """Held-out prompts per domain for each evaluation."""
    eval_pass_k: int = 4
    """OPD evaluations also report pass@k: k samples at the rollout temperature, correct if any is (0: off)."""
    log_every: int = 10
    save_every: int = 0
    """Checkpoint every N steps (0: only at the end)."""
    keep_last: int = 2
    output_dir: str = "runs/default"
    resume: bool | Literal["force"] = True
    """Resume from the newest intact checkpoint in ``output_dir`` when one exists (one of another job
    kind, architecture, tokenizer or objective is an error); ``force`` resumes across such a change."""
    init_checkpoint: str | None = None
    """Initial weights for a fresh run: a checkpoint directory of this project, or a Hugging Face model
    directory (converted once into ``output_dir/hf_cache``, keyed by its content, reused on resume; the
    ``model`` and ``tokenizer`` sections may then be omitted: they come from its config)."""
    verify_checksums: bool = True
    """Before a checkpoint is loaded as a teacher or as ``init_checkpoint``, compare the SHA-256 of every
    file with its manifest (one rank reads the checkpoint once: about 270 MiB/s per CPU core, see
    ``tools/bench/RESULTS_checkpoint_manifest.md``), so bytes changed in place are refused, naming the
    file. ``false``: sizes only, for checkpoints too large to read once more at start-up. A resume always
    verifies the checksums of the checkpoint it resumes from."""
    export_hf: str | None = None
    """After the last step, write the model as a Hugging Face directory here (safetensors, config,
    tokenizer files, chat template, generation config), atomically. Needs an ``hf`` tokenizer."""
    progress: bool = True
    """Show a live progress bar (disabled automatically when output is not a terminal)."""
    optimizer_impl: Literal["torch", "megatron"] = "torch"
    """``torch``: AdamW on the model's own parameters, one flat DP all-reduce after backward, optimizer
    state per rank (a resume needs the same layout). ``megatron``: Megatron-core's
    DistributedDataParallel and ``get_megatron_optimizer`` (Adam with fp32 main parameters for bf16/fp16
    models, dynamic loss scaling for fp16), optimizer state in the reshardable distributed checkpoint."""
    use_distributed_optimizer: bool = False
    """``optimizer_impl: megatron``: shard the optimizer state and fp32 main parameters over DP ranks."""
    overlap_grad_reduce: bool = False
    """``optimizer_impl: megatron``: start each gradient bucket's DP reduction during backward."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation of the student (Megatron's ``recompute_granularity``): ``selective``
    recomputes core attention, ``full`` every transformer layer."""
    max_tokens_per_microbatch: int = 0
    """OPD: build micro-batches by a token budget (rows x padded width) from rollouts grouped by length,
    instead of ``micro_batch_size`` rows padded to the step's longest rollout (0: off)."""
    pack_sequences: bool = False
    """OPD: run the student's decoder on packed rows (THD: each micro-batch's rollouts end to end, no
    padding computed; ``opd_megatron.models.packing``); the loss is exactly the padded one's. Pipeline
    parallelism 1 and no sequence parallelism."""

    def __post_init__(self):
        _check_fields(self)
        _check(self.steps > 0, "steps", f"must be > 0, got {self.steps}")
        _check(self.micro_batch_size > 0, "micro_batch_size", f"must be > 0, got {self.micro_batch_size}")
        _check(self.grad_accumulation > 0, "grad_accumulation", f"must be > 0, got {self.grad_accumulation}")
        _check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _check(0 <= self.min_lr <= self.lr, "min_lr", f"must be in [0, lr={self.lr}], got {self.min_lr}")
        _check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        _check(self.grad_clip >= 0, "grad_clip", "must be >= 0")
        _check(self.keep_last >= 1, "keep_last", "must be >= 1")
        _check(self.eval_every >= 0, "eval_every", f"must be >= 0, got {self.eval_every}")
        _check(
            self.save_every >= 0, "save_every", f"must be >= 0 (0: only at the end), got {self.save_every}"
        )
        _check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        for name in ("adam_beta1", "adam_beta2"):
            _check(0 <= getattr(self, name) < 1, name, f"must be in [0, 1), got {getattr(self, name)}")
        _check(
            self.max_tokens_per_microbatch >= 0,
            "max_tokens_per_microbatch",
            f"must be >= 0 (0: off), got {self.max_tokens_per_microbatch}",
        )
        for name in ("use_distributed_optimizer", "overlap_grad_reduce"):
            _check(
                self.optimizer_impl == "megatron" or not getattr(self, name),
                name,
                "needs optimizer_impl: megatron (Megatron-core's DistributedDataParallel)",
            )


BUILTIN_DOMAINS = ("addition", "reversal", "sorting")
"""Names of the built-in synthetic domains (``opd_megatron.data.domains`` checks it defines exactly these);
kept here so the config never imports the data package."""

ROW_FIELDS = ("prompt", "domain", "reference", "privileged", "messages")
"""Fields of a prompt row (``opd_megatron.data.rows.FIELDS``)."""


@dataclass
class DataConfig:
    """Prompt data: the built-in synthetic domains and/or JSONL files."""

    domains: list[str] = field(default_factory=lambda: list(BUILTIN_DOMAINS))
    """Built-in domains to draw from (see ``opd_megatron.data.domains``)."""
    train_path: str | None = None
    """Training rows: a JSONL file, a Parquet file, or a directory written by ``datasets``'
    ``save_to_disk``. Fields: ``prompt`` or ``messages`` (OpenAI chat format), ``domain``, optional
    ``reference`` and ``privileged`` (see ``opd_megatron.data.rows``). Every row is validated at start-up."""
    eval_path: str | None = None
    """Held-out rows, in any format ``train_path`` accepts; grouped by their ``domain``."""
    fields: dict[str, str] = field(default_factory=dict)
    """Column names of the files for the row fields, e.g. ``{messages: conversations, domain: source}``."""
    extra_fields: Literal["error", "ignore"] = "error"
    """Columns that are no row field: an error naming the row (catches typos), or ignored."""
    default_domain: str | None = None
    """Domain of rows that have none (datasets without a domain column)."""
    train_size: int = 2000
    """Generated training rows per built-in domain."""
    eval_size: int = 200
    """Generated held-out rows per built-in domain (disjoint from training)."""
    seed: int = 0
    difficulty: int = 3
    """Domain size knob (number of digits / characters)."""

    def __post_init__(self):
        _check_fields(self)
        _check(
            bool(self.domains) or bool(self.train_path), "domains", "no built-in domains and no train_path"
        )
        for i, d in enumerate(self.domains):
            _check(
                d in BUILTIN_DOMAINS,
                f"domains[{i}]",
                f"unknown domain {d!r}; known: {', '.join(sorted(BUILTIN_DOMAINS))}",
            )
        for name in self.fields:
            _check(
                name in ROW_FIELDS, f"fields.{name}", f"not a row field; row fields: {', '.join(ROW_FIELDS)}"
            )
        if self.default_domain is not None:
            _check(bool(self.default_domain.strip()), "default_domain", "must be a non-empty string")
        _check(self.train_size > 0 and self.eval_size > 0, "train_size", "sizes must be > 0")
        _check(1 <= self.difficulty <= 12, "difficulty", f"must be in [1, 12], got {self.difficulty}")


@dataclass
class LaunchConfig:
    """Where a run executes (used by ``opd-megatron launch``)."""

    executor: Literal["local", "slurm"] = "local"
    nodes: int = 1
    gpus_per_node: int = 1
    """Processes per node (GPUs, or CPU ranks for a CPU run)."""
    account: str | None = None
    partition: str | None = None
    time: str = "01:00:00"
    container_image: str | None = None
    container_mounts: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    job_dir: str = "runs/launch"
    tunnel: Literal["local", "ssh"] = "local"
    host: str | None = None
    user: str | None = None

    def __post_init__(self):
        _check_fields(self)
        _check(self.nodes >= 1, "nodes", "must be >= 1")
        _check(self.gpus_per_node >= 1, "gpus_per_node", "must be >= 1")
        if self.tunnel == "ssh":
            _check(bool(self.host), "host", "an ssh tunnel needs a host")


ROUTINGS = ("specialty", "confidence", "pass_rate", "mixture")


@dataclass
class MOPDConfig:
    """How several teachers share the supervision of one student (multi-teacher OPD)."""

    routing: Literal["specialty", "confidence", "pass_rate", "mixture"] = "specialty"
    """``specialty``: each rollout goes to the teacher whose ``domains`` list its domain (else
    ``default_teacher``); ``confidence``: every teacher scores, the most confident one supervises the
    rollout; ``pass_rate``: the teacher with the best validation pass rate on the rollout's domain;
    ``mixture``: every teacher scores and the KL target is their weighted mixture."""
    default_teacher: str | None = None
    """Teacher for domains no teacher claims (specialty / pass-rate routing); None: the first teacher."""
    exclusive: bool = True
    """Specialty routing: a domain may be claimed by one teacher only (checked before training)."""
    confidence: Literal["logprob", "entropy"] = "logprob"
    """Confidence routing: highest mean log-prob of the rollout's tokens, or lowest mean entropy."""
    pass_rates: dict[str, dict[str, float]] = field(default_factory=dict)
    """Pass-rate routing: ``{domain: {teacher: rate}}`` from a validation run; empty: measured at start-up
    (greedy exact match of each co-located teacher on the held-out split)."""
    mixture_weights: Literal["fixed", "per_prompt", "per_token"] = "fixed"
    """Mixture routing: the teachers' ``weight`` fields (normalised), or a softmax over teachers of their
    mean log-prob of each rollout (per prompt) or of each token (per token), at ``mixture_temperature``."""
    mixture_temperature: float = 1.0
    disagreement_every: int = 1
    """Log the teachers' JS disagreement on the step's rollouts every this many steps (0: never; under
    specialty routing this scores the batch with every teacher)."""
    max_teacher_failures: int = 3
    """Consecutive steps aborted by a failing teacher before the run stops with that teacher's error."""

    def __post_init__(self):
        _check_fields(self)
        _check(self.mixture_temperature > 0, "mixture_temperature", "must be > 0")
        _check(self.disagreement_every >= 0, "disagreement_every", "must be >= 0")
        _check(self.max_teacher_failures >= 1, "max_teacher_failures", "must be >= 1")
        for domain, rates in self.pass_rates.items():
            for teacher, rate in rates.items():
                _check(0.0 <= rate <= 1.0, f"pass_rates.{domain}.{teacher}", f"must be in [0, 1], got {rate}")


@dataclass
class RunConfig:
    """The root of the tree: everything one job needs."""

    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    teachers: list[TeacherConfig] = field(default_factory=list)
    mopd: MOPDConfig = field(default_factory=MOPDConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    def __post_init__(self):
        _check_fields(self)
        tp, pp = self.parallel.tp, self.parallel.pp
        _check(
            self.model.num_attention_heads % tp == 0,
            "parallel.tensor_model_parallel_size",
            f"TP={tp} does not divide model.num_attention_heads={self.model.num_attention_heads}",
        )
        _check(
            self.model.query_groups % tp == 0,
            "parallel.tensor_model_parallel_size",
            f"TP={tp} does not divide the key/value heads ({self.model.query_groups})",
        )
        _check(
            self.model.num_layers % pp == 0,
            "parallel.pipeline_model_parallel_size",
            f"PP={pp} does not divide model.num_layers={self.model.num_layers}",
        )
        ep = self.parallel.expert_model_parallel_size
        if ep > 1:
            _check(
                self.model.num_experts is not None and self.model.num_experts % ep == 0,
                "parallel.expert_model_parallel_size",
                f"EP={ep} needs a mixture-of-experts model whose num_experts it divides "
                f"(model.num_experts={self.model.num_experts})",
            )
        names = [t.name for t in self.teachers]
        dup = sorted({n for n in names if names.count(n) > 1})
        _check(not dup, "teachers", f"teacher names must be unique; repeated: {', '.join(dup)}")
        _check(
            self.train.export_hf is None or self.tokenizer.kind == "hf",
            "train.export_hf",
            f"exporting a Hugging Face directory needs a Hugging Face tokenizer (tokenizer.kind: hf), got "
            f"{self.tokenizer.kind!r}",
        )
        per_rank = self.train.micro_batch_size * self.train.grad_accumulation
        _check(
            per_rank % self.rollout.samples_per_prompt == 0,
            "rollout.samples_per_prompt",
            f"{self.rollout.samples_per_prompt} does not divide the rollouts per rank and step "
            f"(train.micro_batch_size * train.grad_accumulation = {per_rank})",
        )
        _check(
            self.rollout.max_new_tokens < self.model.max_sequence_length,
            "rollout.max_new_tokens",
            f"{self.rollout.max_new_tokens} leaves no room for a prompt in model.max_sequence_length="
            f"{self.model.max_sequence_length}",
        )


# ----------------------------------------------------------------------------------------------------
# Cross-section checks of a job (beyond each section's own and RunConfig's structural ones)
# ----------------------------------------------------------------------------------------------------


def validate_teachers(cfg: RunConfig) -> None:
    """Static checks of the teacher set against the routing (no files or network touched); every
    error names ``teachers[i]`` and the teacher."""
    _check(bool(cfg.teachers), "teachers", "on-policy distillation needs at least one teacher")
    m = cfg.mopd
    names = [t.name for t in cfg.teachers]
    _check(
        m.default_teacher is None or m.default_teacher in names,
        "mopd.default_teacher",
        f"no teacher named {m.default_teacher!r}; teachers: {names}",
    )
    owners: dict[str, str] = {}
    for i, t in enumerate(cfg.teachers):
        where = f"teachers[{i}]"
        _check(
            not (t.placement == "self" and len(cfg.teachers) > 1),
            f"{where}.placement",
            f"teacher {t.name!r}: self-distillation takes a single teacher",
        )
        _check(
            not (
                m.routing == "mixture"
                and len(cfg.teachers) > 1
                and (t.placement != "colocated" or t.tokenizer)
            ),
            f"{where}.placement",
            f"teacher {t.name!r}: mixture routing mixes full distributions over the student's vocabulary; "
            "every teacher must be co-located with the student's tokenizer (route remote or "
            "cross-tokeniser teachers with specialty, confidence or pass_rate routing)",
        )
        _check(
            t.tokenizer is None or t.tensor_model_parallel_size in (None, cfg.parallel.tp),
            f"{where}.tensor_model_parallel_size",
            f"teacher {t.name!r}: a cross-tokeniser teacher runs at the student's TP size",
        )
        if m.routing == "specialty" and m.exclusive:
            for d in t.domains:
                _check(
                    d not in owners,
                    "teachers",
                    f"domain {d!r} is claimed by teacher {owners.get(d)!r} and by teacher {t.name!r}; specialty "
                    "routing is exclusive (set mopd.exclusive: false to let the first one win)",
                )
                owners[d] = t.name


def _validate_micro_batch_layout(cfg: RunConfig) -> None:
    """Token-budget micro-batches and packed rows change the micro-batch shapes from step to step, which
    pipeline stages (they exchange fixed shapes) and sequence parallelism (it splits the sequence over
    TP ranks) do not allow."""
    one_stage = "needs parallel.pipeline_model_parallel_size 1 (pipeline stages exchange fixed shapes)"
    _check(
        not (cfg.train.max_tokens_per_microbatch and cfg.parallel.pp > 1),
        "train.max_tokens_per_microbatch",
        one_stage,
    )
    _check(not (cfg.train.pack_sequences and cfg.parallel.pp > 1), "train.pack_sequences", one_stage)
    _check(
        not (cfg.train.pack_sequences and cfg.parallel.sequence_parallel),
        "train.pack_sequences",
        "needs parallel.sequence_parallel false (a packed row is not split over TP ranks)",
    )


def validate_opd(cfg: RunConfig) -> None:  # noqa: C901
    """Everything an OPD run needs of its config beyond the sections' own checks. Several teachers,
    remote teachers and teachers of another tokenizer go through the MOPD orchestrator, which supports the
    full-distribution objectives; the features that need one teacher's dense logits over the student's
    vocabulary (sampled-token objectives, teacher-mixed sampling, teacher-sampled off-policy data) need
    exactly one co-located (or self) teacher of the student's tokenizer."""
    validate_teachers(cfg)
    _validate_micro_batch_layout(cfg)
    lc, t = cfg.loss, cfg.teachers[0]
    single_dense = len(cfg.teachers) == 1 and t.placement not in ("remote", "vllm") and t.tokenizer is None
    needs = [
        (lc.objective != "divergence", "loss.objective", f"objective {lc.objective!r}"),
        (lc.mix_alpha > 0, "loss.mix_alpha", "teacher-mixed sampling"),
        (
            lc.on_policy_lambda < 1 and lc.off_policy_source == "teacher",
            "loss.off_policy_source",
            "teacher-sampled off-policy data",
        ),
    ]
    for bad, path, what in needs:
        _check(
            not bad or single_dense,
            path,
            f"{what} needs exactly one co-located teacher with the student's tokenizer (got "
            f"{len(cfg.teachers)} teacher(s), the first {t.placement!r}"
            f"{' with its own tokenizer' if t.tokenizer else ''})",
        )
    _check(
        not (
            lc.objective in SAMPLED_OBJECTIVES
            and (lc.on_policy_lambda < 1 or lc.lambda_schedule != "constant")
        ),
        "loss.on_policy_lambda",
        f"the sampled-token objective {lc.objective!r} is on-policy; set it to 1.0",
    )
    _check(
        not (lc.mix_alpha > 0 and t.placement == "self"),
        "loss.mix_alpha",
        "teacher-mixed sampling needs a teacher with the student's prompt view",
    )
    _check(
        not (lc.mix_alpha > 0 and t.tensor_model_parallel_size not in (None, cfg.parallel.tp)),
        "loss.mix_alpha",
        "teacher-mixed sampling needs the teacher at the student's TP size",
    )
    _check(
        not (lc.objective == "opsd" and lc.opsd_tau <= 0),
        "loss.opsd_tau",
        "objective 'opsd' needs a per-token clip tau > 0",
    )


# ----------------------------------------------------------------------------------------------------
# dict <-> dataclass
# ----------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Coerce ``value`` (from YAML or an override) to the annotated type ``tp`` or raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, path)
            except ConfigError as e:
                errors.append(e.message)
        raise ConfigError(path, "; ".join(errors))
    if origin is Literal:
        if value not in args:
            raise ConfigError(path, f"got {value!r}; allowed: {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(path, f"expected a list, got {type(value).__name__} {value!r}")
        (item_tp,) = args or (Any,)
        return [_convert(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping, got {type(value).__name__} {value!r}")
        _, v_tp = args or (Any, Any)
        return {str(k): _convert(v, v_tp, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(
                path, f"expected a mapping for {tp.__name__}, got {type(value).__name__} {value!r}"
            )
        return from_dict(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(path, f"expected true/false, got {type(value).__name__} {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(path, f"expected an integer, got {type(value).__name__} {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(path, f"expected a number, got {type(value).__name__} {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(path, f"expected a string, got {type(value).__name__} {value!r}")
    raise ConfigError(path, f"unsupported type {_type_name(tp)}")  # internal: a field type we do not handle


def _unknown_key(cls: type, key: str, path: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(names)}"
    return ConfigError(f"{path}.{key}" if path else key, f"unknown key for {cls.__name__}{hint}")


def from_dict(cls: type, data: dict, path: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(path, f"expected a mapping for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown_key(cls, str(key), path)
        kwargs[key] = _convert(value, hints[key], f"{path}.{key}" if path else key)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise e.with_prefix(path) from None


def to_dict(obj: Any) -> Any:
    """Plain-data view of a config (for YAML and checkpoints)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides to a plain mapping (values parsed as YAML scalars/lists)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "an override must look like section.field=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            if part.isdigit() and isinstance(node, list):
                idx = int(part)
                if idx >= len(node):
                    raise ConfigError(
                        ".".join(parts[: i + 1]), f"index {idx} out of range (list has {len(node)})"
                    )
                node = node[idx]
            else:
                node = node.setdefault(part, {})
                if not isinstance(node, dict | list):
                    raise ConfigError(
                        ".".join(parts[: i + 1]), "is not a section; cannot set a field inside it"
                    )
        node[parts[-1]] = _parse_scalar(raw)
    return data


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: RunConfig | None = None,
    prepare=None,
) -> RunConfig:
    """Load a RunConfig from YAML (or start from ``base``/defaults) and apply dotted overrides.
    ``prepare(mapping) -> mapping`` may complete the raw mapping before it is validated (the CLI fills the
    ``model`` section from a Hugging Face ``train.init_checkpoint`` this way)."""
    data: dict = to_dict(base) if base is not None else {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError("", f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError("", f"{p}: invalid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError("", f"{p}: the top level must be a mapping, got {type(loaded).__name__}")
        data = _deep_merge(data, loaded)
    apply_overrides(data, list(overrides or []))
    if prepare is not None:
        data = prepare(data)
    return from_dict(RunConfig, data)


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
