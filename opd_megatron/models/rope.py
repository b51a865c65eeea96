"""Rotary-embedding frequencies, including the scaled variants of Llama-3.x checkpoints.

Megatron-core's ``RotaryEmbedding`` computes ``inv_freq`` once at construction and supports Llama-3
scaling only with the band edges of Llama 3.1 hard-coded (low 1, high 4, original context 8192). This
module computes the frequencies of every variant the builder accepts from the config alone, and the
builder installs them on the model's rotary module, so a checkpoint with other band edges is still
computed exactly as its HF model computes it.

YaRN is not built here: the builder uses megatron-core's ``YarnRotaryEmbedding`` (``position_embedding_type
"yarn"``), whose frequencies equal transformers', and Megatron's self-attention multiplies cos/sin by
YaRN's attention factor (see :func:`opd_megatron.models.gpt.set_yarn_fields`). ``dynamic`` NTK scaling,
whose base grows with the sequence length, cannot be expressed as fixed frequencies and is rejected by the
converter.
"""

from __future__ import annotations

import math

import torch

from opd_megatron.config import ModelConfig


def default_inv_freq(base: float, dim: int) -> torch.Tensor:
    """RoFormer frequencies ``theta_i = base^(-2i/d)`` for ``i = 0 .. d/2 - 1``, float32 ``[d/2]``."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def llama3_inv_freq(
    inv_freq: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float, original_max: int
) -> torch.Tensor:
    """Llama 3.1's banded rescaling of RoPE frequencies.

    With wavelength ``lambda_i = 2 pi / theta_i``, ``L_low = original_max / low_freq_factor`` and
    ``L_high = original_max / high_freq_factor``::

        theta'_i = theta_i                              if lambda_i < L_high   (high frequencies kept)
                 = theta_i / factor                     if lambda_i > L_low    (low frequencies interpolated)
                 = (1 - s) theta_i / factor + s theta_i otherwise,
                   s = (original_max / lambda_i - low_freq_factor) / (high_freq_factor - low_freq_factor)
    """
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = original_max / low_freq_factor
    high_wavelen = original_max / high_freq_factor
    smooth = (original_max / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > low_wavelen, inv_freq / factor, blended)
    return torch.where(wavelen < high_wavelen, inv_freq, out)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """The float32 ``[head_dim / 2]`` frequencies of ``cfg`` (``rope_scaling`` none, linear or llama3;
    YaRN's come from Megatron's ``YarnRotaryEmbedding``).

    ``linear`` (position interpolation) is ``theta_i / factor``: position ``m`` rotates as ``m / factor``.
    """
    inv_freq = default_inv_freq(cfg.rotary_base, cfg.kv_channels)
    if cfg.rope_scaling == "linear":
        return inv_freq / cfg.rope_scaling_factor
    if cfg.rope_scaling == "llama3":
        return llama3_inv_freq(
            inv_freq,
            cfg.rope_scaling_factor,
            cfg.rope_low_freq_factor,
            cfg.rope_high_freq_factor,
            cfg.rope_original_max_position,
        )
    return inv_freq
