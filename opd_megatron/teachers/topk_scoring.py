"""In-process top-k prompt scoring: what the teacher service computes, without the HTTP around it.

For a token sequence ``s`` of length ``L``, position ``t >= 1`` is scored by the model's next-token
distribution after ``s[:t]``: ``log_softmax(logits[t - 1])`` over the real vocabulary (padding rows of the
embedding are never candidates). The result has ``L - 1`` rows; row ``j`` scores token ``s[j + 1]``.
This is vLLM's ``prompt_logprobs`` without its leading ``None``.

The full ``[positions, V]`` log-probs exist only one chunk of positions at a time, so a long batch of a
large-vocabulary model needs ``chunk_tokens * V`` floats, not ``tokens * V``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from opd_megatron.models.gpt import output_weight
from opd_megatron.models.hidden import decoder_hidden_states
from opd_megatron.teachers.colocated import right_pad


class PromptScores(NamedTuple):
    """Scores of one sequence of ``L`` tokens: ``L - 1`` rows, row ``j`` for token ``j + 1``."""

    topk_ids_LK: torch.Tensor
    """``[L - 1, k]`` vocabulary ids of the k most likely tokens, most likely first."""
    topk_logprobs_LK: torch.Tensor
    """``[L - 1, k]`` their normalised log-probs (fp32)."""
    token_logprobs_L: torch.Tensor
    """``[L - 1]`` log-prob of the token actually at that position."""
    token_ranks_L: torch.Tensor
    """``[L - 1]`` its 1-based rank in the vocabulary (1 + number of strictly more likely tokens)."""

    def truncate(self, k: int) -> PromptScores:
        """The same scores for a smaller k (top-k of a larger top-k is the top-k)."""
        return self._replace(
            topk_ids_LK=self.topk_ids_LK[:, :k], topk_logprobs_LK=self.topk_logprobs_LK[:, :k]
        )


class TopKScorer:
    """Top-k prompt log-probs from a Megatron GPTModel built at TP=1, PP=1 (one process holds the whole
    vocabulary; a TP-split model would need :func:`~opd_megatron.losses.topk.distributed_topk`)."""

    def __init__(self, model, groups, pad_id: int = 0, chunk_tokens: int = 2048):
        if groups.tp_size != 1 or groups.pp_size != 1:
            raise ValueError(
                f"TopKScorer runs the whole model in one process (TP=1, PP=1), got TP={groups.tp_size} "
                f"PP={groups.pp_size}"
            )
        self.model, self.groups, self.pad_id, self.chunk_tokens = model, groups, pad_id, chunk_tokens
        self.vocab_size: int = model.real_vocab_size
        self.max_sequence_length: int = model.max_sequence_length

    def check(self, seqs: list[list[int]], k: int) -> None:
        """Raise ``ValueError`` with a specific message for input the model cannot score."""
        if not 0 <= k <= self.vocab_size:
            raise ValueError(f"k must be in [0, {self.vocab_size}], got {k}")
        for i, s in enumerate(seqs):
            if not 0 < len(s) <= self.max_sequence_length:
                raise ValueError(
                    f"sequence {i} has {len(s)} tokens; allowed: 1 to {self.max_sequence_length} "
                    "(the model's max_sequence_length)"
                )
            bad = next((t for t in s if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise ValueError(
                    f"sequence {i}: token id {bad} is outside the vocabulary [0, {self.vocab_size})"
                )

    @torch.no_grad()
    def score(self, seqs: list[list[int]], k: int) -> list[PromptScores]:
        """Score every position of every sequence in one forward pass (sequences right-padded)."""
        self.check(seqs, k)
        if not seqs:
            return []
        device = self.groups.device
        tokens_BS = right_pad(seqs, self.pad_id, device)
        pos_BS = torch.arange(tokens_BS.shape[1], device=device).expand_as(tokens_BS)
        self.model.eval()
        # Right padding under a causal mask never changes the real positions' outputs.
        hidden_SBH = decoder_hidden_states(self.model, tokens_BS, pos_BS, None)
        weight_VH = output_weight(self.model)[: self.vocab_size].float()  # drop padded vocabulary rows
        out = []
        for i, s in enumerate(seqs):
            n = len(s) - 1
            targets_L = tokens_BS[i, 1 : n + 1]
            parts = []
            for a in range(0, n, self.chunk_tokens):
                b = min(n, a + self.chunk_tokens)
                logprobs_CV = torch.log_softmax(hidden_SBH[a:b, i].float() @ weight_VH.t(), dim=-1)
                values_CK, ids_CK = logprobs_CV.topk(k, dim=-1)  # [C, V] -> [C, k]
                tok_C = logprobs_CV.gather(-1, targets_L[a:b, None]).squeeze(-1)
                rank_C = (logprobs_CV > tok_C[:, None]).sum(-1) + 1  # [C, V] -> [C]
                parts.append((ids_CK, values_CK, tok_C, rank_C))
            if parts:
                out.append(PromptScores(*(torch.cat(p).cpu() for p in zip(*parts))))
            else:  # a one-token sequence has no scored position
                out.append(
                    PromptScores(
                        torch.zeros(0, k, dtype=torch.long),
                        torch.zeros(0, k),
                        torch.zeros(0),
                        torch.zeros(0, dtype=torch.long),
                    )
                )
        return out
