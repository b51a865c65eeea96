"""Pre-lm-head hidden states of a Megatron GPTModel stage.

The fused distillation loss takes hidden states and the output-layer shard instead of logits, so the
``[tokens, V/tp]`` logits of the whole batch never exist. ``GPTModel.forward`` always applies the output
layer on the last stage; this runs the same embedding, rotary and decoder steps and stops before it.
"""

from __future__ import annotations

import torch


def decoder_hidden_states(
    model,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    inference_context=None,
    packed_seq_params=None,
) -> torch.Tensor:
    """This stage's decoder output ``[s, b, h]``; on the last stage it is final-normed, ready for the
    output layer. Non-first stages read their input from ``model.set_input_tensor``. With an
    ``inference_context`` (e.g. Megatron-core's ``StaticInferenceContext``, model in eval mode) the
    attention layers append to and read from its KV cache; the caller advances its offsets. With
    ``packed_seq_params`` (THD, see :mod:`~opd_megatron.models.packing`) the input is one packed row
    ``[1, T]`` and the output ``[T, 1, h]``."""
    pre = model._preprocess(
        input_ids=input_ids,
        position_ids=position_ids,
        inference_context=inference_context,
        packed_seq_params=packed_seq_params,
    )
    decoder_input, rotary_pos_emb, rotary_pos_cos, rotary_pos_sin, sequence_len_offset = pre[:5]
    return model.decoder(
        hidden_states=decoder_input,
        attention_mask=attention_mask,
        inference_context=inference_context,
        rotary_pos_emb=rotary_pos_emb,
        rotary_pos_cos=rotary_pos_cos,
        rotary_pos_sin=rotary_pos_sin,
        sequence_len_offset=sequence_len_offset,
        packed_seq_params=packed_seq_params,
    )
