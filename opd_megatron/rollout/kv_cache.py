"""One model's pipeline stage decoding against its own static KV cache.

The cache is Megatron-core's ``StaticInferenceContext``: each attention layer of this stage lazily
allocates ``[max_seq, max_batch, kv_heads / tp, head_dim]`` key and value buffers on first use and
then writes each step's keys in place. The context is kept between batches and ``generate`` calls and
only replaced when a batch needs more rows or positions than it holds, so no step and no repeated call
allocates cache memory.

``GPTModel.forward`` with an inference context insists on gathering the full-vocabulary logits, so the
stage runs embedding + decoder itself (:func:`~opd_megatron.models.hidden.decoder_hidden_states`) and,
on the last stage, applies this rank's output-layer shard to the last position only.

Stages the lean decode path covers (:mod:`~opd_megatron.rollout.lean_decode`: the dense local-spec
layers this project builds) run through it instead of Megatron's modules, with a KV cache of their own;
``lean=False`` keeps Megatron's forward and its ``StaticInferenceContext`` for every stage.
"""

from __future__ import annotations

import torch

from opd_megatron.distributed import ParallelGroups
from opd_megatron.distributed.pipeline import pipeline_forward
from opd_megatron.models.gpt import output_weight, vocab_shard_range
from opd_megatron.models.hidden import decoder_hidden_states
from opd_megatron.rollout.lean_decode import LeanStage, decode_linear, lean_unsupported
from opd_megatron.rollout.vocab_parallel import mask_padded_vocab

__all__ = ["CachedStage"]


class CachedStage:
    """Callable like a GPTModel stage inside :func:`pipeline_forward`, but through a KV cache.

    Call :meth:`prepare` before each batch, then :meth:`logits` with the whole left-padded prompt
    (prefill) and then with one new token per row at a time.
    """

    def __init__(self, model, groups: ParallelGroups, lean: bool = True):
        self.model = model
        self.groups = groups
        self.context = None
        self.shard_start, _ = vocab_shard_range(model, groups.tp_rank, groups.tp_size)
        self.lean = LeanStage(model, groups) if lean and lean_unsupported(model, groups) is None else None
        self._input_tensor = None

    # The two attributes pipeline_forward uses on a model.
    @property
    def config(self):
        return self.model.config

    def set_input_tensor(self, tensor: torch.Tensor) -> None:
        if self.lean is not None:
            self._input_tensor = tensor
        else:
            self.model.set_input_tensor(tensor)

    def prepare(self, batch: int, seq_len: int) -> None:
        """Empty the cache for a batch of ``batch`` rows and up to ``seq_len`` positions."""
        if self.lean is not None:
            self.lean.prepare(batch, seq_len)
            return
        from megatron.core.inference.contexts import StaticInferenceContext

        ctx = self.context
        if ctx is None or ctx.max_batch_size < batch or ctx.max_sequence_length < seq_len:
            # Grow to cover both the old and the new shape, so alternating batch shapes settle at once.
            rows = max(batch, ctx.max_batch_size if ctx else 0)
            positions = max(seq_len, ctx.max_sequence_length if ctx else 0)
            self.context = StaticInferenceContext(max_batch_size=rows, max_sequence_length=positions)
        else:
            ctx.reset()

    def release(self) -> None:
        """Drop the cache buffers (they are allocated again on the next batch)."""
        self.context = None
        if self.lean is not None:
            self.lean.release()

    def __call__(self, input_ids_BS, position_ids_BS, attention_mask):
        """This stage's hidden states ``[s, b, h]`` for the new positions; advances the cache."""
        if self.lean is not None:
            return self.lean.forward(input_ids_BS, attention_mask, self._input_tensor)
        hidden_SBH = decoder_hidden_states(
            self.model, input_ids_BS, position_ids_BS, attention_mask, inference_context=self.context
        )
        self.context.sequence_len_offset += input_ids_BS.shape[1]
        return hidden_SBH

    def logits(self, input_ids_BS, position_ids_BS, attention_mask) -> torch.Tensor | None:
        """Next-token logits ``[B, V/tp]`` (fp32, padding rows of the vocabulary at ``-inf``) on the last
        pipeline stage, ``None`` on the others. Runs every stage, passing hidden states stage to stage."""
        hidden_SBH = pipeline_forward(
            self,
            input_ids_BS,
            position_ids_BS,
            self.groups,
            attention_mask=attention_mask,
            hidden_dtype=self.model.config.pipeline_dtype or torch.float32,
        )
        if hidden_SBH is None:
            return None
        # Only the last position predicts the next token; the head sees [B, H], not [S, B, H].
        logits_BV = decode_linear(hidden_SBH[-1], output_weight(self.model)).float()
        return mask_padded_vocab(logits_BV, self.shard_start, self.model.real_vocab_size)
