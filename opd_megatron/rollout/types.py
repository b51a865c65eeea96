"""The sampler interface: what to sample (:class:`SamplingParams`), what comes back (:class:`Rollout`), and
the :class:`Sampler` protocol that the Megatron KV-cache sampler and a vLLM engine both implement.

The OPD loop only talks to these types, so the engine behind them can change without touching it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from opd_megatron.config import RolloutConfig

__all__ = ["FINISH_REASONS", "Rollout", "Sampler", "SamplingParams"]

FINISH_REASONS = ("eos", "stop", "length")
"""Why a completion ended: it generated EOS, its text reached a stop string, or it hit max_new_tokens."""


@dataclass
class SamplingParams:
    """How to sample one batch of completions.

    Filters apply in the usual order (as in vLLM / Hugging Face): logits are divided by ``temperature``,
    then only the ``top_k`` most likely tokens are kept, then only the smallest set of those whose
    probability (renormalised after top-k) reaches ``top_p``; the token is drawn from what is left,
    renormalised.
    """

    max_new_tokens: int = 16
    """Most tokens generated per prompt (EOS included)."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (argmax, no randomness)."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]; 1 disables it."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 disables it."""
    stop: list[str] = field(default_factory=list)
    """Stop strings: a completion ends once its decoded text contains one (the stop string is kept)."""
    seed: int | None = None
    """Seed of the sampling noise; ``None`` draws a fresh one. The same seed, inputs, model and parallel
    layout give the same completions."""

    def __post_init__(self):
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be finite and >= 0 (0 is greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if isinstance(self.stop, str):
            raise ValueError(f"stop must be a list of strings, got the string {self.stop!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def filtered(self) -> bool:
        """True when top-k or top-p removes tokens from the sampling distribution."""
        return self.top_k > 0 or self.top_p < 1.0

    @classmethod
    def from_config(cls, cfg: RolloutConfig, seed: int | None = None) -> SamplingParams:
        return cls(
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            stop=list(cfg.stop),
            seed=seed,
        )


@dataclass
class Rollout:
    """Completions of a batch of prompts, one entry per sample, in prompt order.

    ``logprobs[i][t]`` is the behaviour log-probability of ``completion_ids[i][t]``: the log of the
    probability with which the sampler drew that token, i.e. ``log_softmax(logits / T)`` restricted to
    the tokens that survive top-k / top-p and renormalised over them (for teacher-mixed sampling, the
    log of the mixture probability). Greedy decoding (``T = 0``) draws from a point mass, which carries no
    information, so there it is the model's unscaled ``log_softmax(logits)`` at the chosen token.

    ``importance_weights[i][t]`` (teacher-mixed sampling only, else ``None``) is
    ``q_theta(y_t) / p_mix(y_t)``: the student's probability of the token over the probability it was
    sampled with.
    """

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    """Generated tokens, including the EOS token when one was generated."""
    logprobs: list[list[float]]
    finish_reason: list[str]
    """Per sample: ``"eos"``, ``"stop"`` or ``"length"``."""
    importance_weights: list[list[float]] | None = None

    def __post_init__(self):
        n = len(self.prompt_ids)
        sizes = [len(self.completion_ids), len(self.logprobs), len(self.finish_reason)]
        if self.importance_weights is not None:
            sizes.append(len(self.importance_weights))
        if any(s != n for s in sizes):
            raise ValueError(f"rollout fields disagree on the number of samples: {n} prompts vs {sizes}")
        for i, (c, lp) in enumerate(zip(self.completion_ids, self.logprobs)):
            if len(c) != len(lp):
                raise ValueError(f"sample {i}: {len(c)} completion tokens but {len(lp)} log-probs")
        bad = set(self.finish_reason) - set(FINISH_REASONS)
        if bad:
            raise ValueError(f"unknown finish reasons {sorted(bad)}; expected one of {FINISH_REASONS}")

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def to_batch(
        self, pad_id: int, width: int | None = None, device: torch.device | str | None = None
    ) -> dict[str, torch.Tensor]:
        """Right-padded ``prompt + completion`` sequences with shifted labels (the SFT batch convention).

        For a sample with ``P`` prompt and ``C`` completion tokens (length ``L = P + C``):

        * ``tokens[t]`` is the input at position ``t`` (int64 ``[B, W]``, ``pad_id`` after ``L``);
        * ``labels[t] = tokens[t + 1]`` (the last label and padding are ``pad_id``);
        * ``loss_mask[t] = 1`` iff ``labels[t]`` is a completion token, i.e. ``P - 1 <= t < L - 1``
          (float32);
        * ``behaviour_logprobs[t]`` is ``logprobs[t - P + 1]``, the log-prob of ``labels[t]``, on those
          positions and 0 elsewhere (float32); ``importance_weights`` likewise (1 elsewhere) when present;
        * ``lengths`` is ``L`` per sample (int64 ``[B]``).

        ``W`` is ``width`` or the longest sequence; a ``width`` shorter than that is an error.
        """
        if not self.prompt_ids:
            raise ValueError("to_batch needs at least one sample")
        lengths = [len(p) + len(c) for p, c in zip(self.prompt_ids, self.completion_ids)]
        longest = max(lengths)
        w = longest if width is None else width
        if w < longest:
            raise ValueError(f"width {w} is shorter than the longest prompt + completion ({longest} tokens)")
        b = len(self)
        tokens_BW = torch.full((b, w), pad_id, dtype=torch.long)
        labels_BW = torch.full((b, w), pad_id, dtype=torch.long)
        mask_BW = torch.zeros(b, w)
        logprobs_BW = torch.zeros(b, w)
        weights_BW = torch.ones(b, w) if self.importance_weights is not None else None
        for i, (p, c) in enumerate(zip(self.prompt_ids, self.completion_ids)):
            if not p:
                raise ValueError(f"sample {i} has an empty prompt: no position predicts its first token")
            n = len(p) + len(c)
            seq = torch.tensor(p + c, dtype=torch.long)
            tokens_BW[i, :n] = seq
            labels_BW[i, : n - 1] = seq[1:]
            if c:
                # Position t predicts token t + 1; the first completion token is token P.
                span = slice(len(p) - 1, n - 1)
                mask_BW[i, span] = 1.0
                logprobs_BW[i, span] = torch.tensor(self.logprobs[i], dtype=torch.float32)
                if weights_BW is not None:
                    weights_BW[i, span] = torch.tensor(self.importance_weights[i], dtype=torch.float32)
        batch = {
            "tokens": tokens_BW,
            "labels": labels_BW,
            "loss_mask": mask_BW,
            "behaviour_logprobs": logprobs_BW,
            "lengths": torch.tensor(lengths, dtype=torch.long),
        }
        if weights_BW is not None:
            batch["importance_weights"] = weights_BW
        return {k: v.to(device) for k, v in batch.items()} if device is not None else batch


class Sampler(Protocol):
    """Anything that turns prompts into :class:`Rollout` s (Megatron KV-cache sampler, vLLM engine)."""

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> Rollout: ...


def check_generate_request(
    prompts, params: SamplingParams, vocab_size: int, max_sequence_length: int, has_tokenizer: bool, who: str
) -> None:
    """What every sampler checks before generating: prompts non-empty and inside the vocabulary, the
    longest prompt plus ``max_new_tokens`` inside the context, a tokenizer for stop strings. ``who``
    names the sampler in the messages."""
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
    if len(prompts) == 0:
        raise ValueError("generate needs at least one prompt, got an empty prompt list")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: a completion needs at least one prompt token")
        lo, hi = min(p), max(p)
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"prompt {i} has token id {bad}, outside the vocabulary [0, {vocab_size})")
    longest = max(len(p) for p in prompts)
    if longest + params.max_new_tokens > max_sequence_length:
        raise ValueError(
            f"the longest prompt ({longest} tokens) plus max_new_tokens ({params.max_new_tokens}) exceeds "
            f"max_sequence_length={max_sequence_length}; shorten the prompts, lower max_new_tokens, "
            f"or build the {who} with a larger max_sequence_length"
        )
    if params.stop and not has_tokenizer:
        raise ValueError(f"stop strings need a tokenizer: pass tokenizer= to the {who}")
