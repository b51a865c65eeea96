"""KV-cache rollout sampler on Megatron-core GPTModels, at any TP/PP, on CPU and GPU.

One ``generate`` call: prompts are sorted by length and cut into batches of at most ``max_batch_size``;
each batch is left-padded (the scheme of :mod:`opd_megatron.rollout.greedy`: pad keys are masked, and
RoPE is relative, so a padded row computes what it would alone), prefilled in one forward, then decoded
one token per step against a static KV cache. Each pipeline stage keeps its own cache; hidden states go
stage to stage by point-to-point sends; the last stage chooses the tokens with the vocabulary-parallel
maths of :mod:`opd_megatron.rollout.sampling` (no rank ever holds ``[B, V]``) and broadcasts them, with
their log-probabilities, to the other stages.

Per step the work is: one forward of one token per row, one all-gather of a few numbers per row across
TP, one broadcast across PP (when PP > 1), and one host sync to learn whether every row has finished.
Finished rows keep decoding (their outputs are ignored) until the whole batch is done.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.distributed as dist

from opd_megatron.distributed import ParallelGroups
from opd_megatron.distributed.pipeline import broadcast_from_last_stage
from opd_megatron.models.attention import SDPACoreAttention
from opd_megatron.rollout.greedy import left_pad, padding_attention_mask
from opd_megatron.rollout.kv_cache import CachedStage
from opd_megatron.rollout.sampling import (
    VocabShard,
    choose_filtered,
    choose_greedy,
    choose_gumbel,
    choose_mixture,
)
from opd_megatron.rollout.types import Rollout, Sampler, SamplingParams, check_generate_request

__all__ = ["MegatronSampler", "Rollout", "Sampler", "SamplingParams"]

_EOS, _STOP, _LENGTH = 0, 1, 2
_REASONS = {_EOS: "eos", _STOP: "stop", _LENGTH: "length"}


def seed_for_rank(seed: int, rank: int) -> int:
    """A per-TP-rank seed (splitmix-style mixing keeps neighbouring seeds' streams unrelated)."""
    x = (seed + 0x9E3779B97F4A7C15 * (rank + 1)) % (1 << 64)
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % (1 << 64)
    return (x ^ (x >> 27)) % (1 << 63)


class MegatronSampler:
    """Samples completions from a Megatron GPTModel (this rank's TP shard / PP stage) with a KV cache.

    Every rank of the model's TP x PP group calls :meth:`generate` with the same prompts and parameters
    and gets the same :class:`Rollout` back.

    Args:
        model: this rank's GPTModel stage, built by :func:`opd_megatron.models.gpt.build_gpt_model`.
        groups: the process groups the model was built with.
        eos_id: a row finishes when it generates this id (which is kept in its completion).
        stop_ids: more ids that end a row the same way (a chat template's end-of-turn token and EOS).
        pad_id: fills the left padding of prompts; never attended to.
        tokenizer: needed only for stop strings (it decodes completions).
        max_batch_size: most rows decoded together; larger prompt lists run in several batches. The KV
            cache holds ``2 * layers/pp * max_batch_size * max_sequence_length * kv_hidden/tp`` values.
        max_sequence_length: longest prompt + completion; defaults to the model's
            ``max_sequence_length``. Longer requests are an error, not a silent cut.
        top_p_candidates: with top-p but no top-k, the nucleus is taken over the global top
            ``top_p_candidates`` tokens (see :func:`~opd_megatron.rollout.sampling.choose_filtered`).
        lean_decode: run the model stages the lean decode path covers through it
            (:mod:`~opd_megatron.rollout.lean_decode`: same maths, a fraction of the per-token overhead);
            ``False`` keeps Megatron-core's own forward for every stage.
    """

    def __init__(
        self,
        model,
        groups: ParallelGroups,
        *,
        eos_id: int,
        pad_id: int,
        tokenizer=None,
        stop_ids: Sequence[int] = (),
        max_batch_size: int = 64,
        max_sequence_length: int | None = None,
        top_p_candidates: int = 1024,
        lean_decode: bool = True,
    ):
        if max_batch_size <= 0:
            raise ValueError(f"max_batch_size must be > 0, got {max_batch_size}")
        if top_p_candidates <= 0:
            raise ValueError(f"top_p_candidates must be > 0, got {top_p_candidates}")
        self.model = model
        self.groups = groups
        self.eos_id = eos_id
        self.end_ids = tuple(dict.fromkeys([eos_id, *stop_ids]))
        self.pad_id = pad_id
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_sequence_length = max_sequence_length or model.max_sequence_length
        self.top_p_candidates = top_p_candidates
        self.vocab_size = model.real_vocab_size
        for name, tok in (*(("eos_id", e) for e in self.end_ids), ("pad_id", pad_id)):
            if not 0 <= tok < self.vocab_size:
                raise ValueError(f"{name}={tok} is outside the model's vocabulary [0, {self.vocab_size})")
        self.lean_decode = lean_decode
        self._stage = CachedStage(model, groups, lean=lean_decode)
        # The teacher of the last mixed call: its cache is reused while the same teacher comes back.
        self._teacher_stage: CachedStage | None = None
        per_rank = model.padded_vocab_size // groups.tp_size
        self._shard = VocabShard(
            start=self._stage.shard_start,
            size=per_rank,
            tp_group=groups.tp_group if groups.tp_size > 1 else None,
            tp_size=groups.tp_size,
        )

    def release(self) -> None:
        """Free the KV caches (student and teacher); the next call allocates them again. Training between
        rollouts may want the memory back; the cache is otherwise kept so calls do not re-allocate."""
        self._stage.release()
        self._teacher_stage = None

    # ------------------------------------------------------------------ validation
    def _check_request(self, prompts, params: SamplingParams) -> None:
        check_generate_request(
            prompts, params, self.vocab_size, self.max_sequence_length, self.tokenizer is not None, "sampler"
        )

    def _mixing_stage(self, teacher, alpha: float, params: SamplingParams) -> CachedStage:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"mix_with alpha must be in [0, 1], got {alpha}")
        if params.greedy:
            raise ValueError("teacher-mixed sampling needs temperature > 0 (greedy has no mixture)")
        if params.filtered:
            raise ValueError("teacher-mixed sampling supports temperature only; set top_k=0 and top_p=1")
        if (
            teacher.real_vocab_size != self.vocab_size
            or teacher.padded_vocab_size != self.model.padded_vocab_size
        ):
            raise ValueError(
                f"the teacher's vocabulary ({teacher.real_vocab_size} tokens, padded {teacher.padded_vocab_size}) "
                f"differs from the student's ({self.vocab_size}, padded {self.model.padded_vocab_size}): "
                "its vocabulary shards would not line up"
            )
        if (teacher.pre_process, teacher.post_process) != (self.model.pre_process, self.model.post_process):
            raise ValueError("the teacher must be split into the same pipeline stages as the student")
        if self._teacher_stage is None or self._teacher_stage.model is not teacher:
            self._teacher_stage = CachedStage(teacher, self.groups, lean=self.lean_decode)
        return self._teacher_stage

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        mix_with: tuple[torch.nn.Module, float] | None = None,
    ) -> Rollout:
        """Sample one completion per prompt.

        ``mix_with=(teacher_model, alpha)`` samples each token from ``alpha * p_T + (1 - alpha) * q_theta``
        (MiniLLM; both at ``params.temperature``, no top-k / top-p); the teacher runs with its own KV
        cache on the same groups and must have the same vocabulary shards. The rollout then carries
        ``importance_weights``.

        A stop string ends a row once the decoded completion contains it; the tokens up to and including
        the one that completed it are kept (so the stop string stays in the text, possibly followed by the
        rest of that last token). EOS ends a row and is kept.
        """
        self._check_request(prompts, params)
        stages = [self._stage]
        alpha = 0.0
        if mix_with is not None:
            teacher, alpha = mix_with
            stages.append(self._mixing_stage(teacher, float(alpha), params))
        self._check_attention(prompts, [st.model for st in stages])
        generators = self._generators(params) if self.groups.is_last_stage else None

        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        completions: list[list[int]] = [[] for _ in prompts]
        logprobs: list[list[float]] = [[] for _ in prompts]
        weights: list[list[float]] = [[] for _ in prompts]
        reasons = [""] * len(prompts)
        modes = [(s.model, s.model.training) for s in stages]
        try:
            for s in stages:
                s.model.eval()
            for start in range(0, len(order), self.max_batch_size):
                rows = order[start : start + self.max_batch_size]
                out = self._generate_batch(
                    [list(prompts[i]) for i in rows], params, stages, alpha, generators
                )
                for j, i in enumerate(rows):
                    completions[i], logprobs[i], weights[i], reasons[i] = (x[j] for x in out)
        finally:
            for model, training in modes:
                model.train(training)
        return Rollout(
            prompt_ids=[list(p) for p in prompts],
            completion_ids=completions,
            logprobs=logprobs,
            finish_reason=reasons,
            importance_weights=weights if mix_with is not None else None,
        )

    @staticmethod
    def _check_attention(prompts, models) -> None:
        """Left padding needs a core attention that honours an arbitrary mask (ours does; the Transformer
        Engine spec's causal attention would silently attend to pad keys)."""
        if len({len(p) for p in prompts}) == 1:
            return
        if not all(any(isinstance(m, SDPACoreAttention) for m in model.modules()) for model in models):
            raise NotImplementedError(
                "prompts of different lengths need left padding, which this sampler supports only with the "
                "local (SDPA) attention spec; build the model with model.transformer_impl='local' or pass "
                "prompts of equal length"
            )

    def _generators(self, params: SamplingParams) -> tuple[torch.Generator, torch.Generator]:
        """(shared, per-shard) generators. The shared one is identical on every TP rank (top-k/top-p draws,
        mixture components); the per-shard one differs by rank (Gumbel noise of its own vocabulary)."""
        seed = params.seed
        if seed is None:
            seed = int.from_bytes(os.urandom(7), "little")
            if self.groups.tp_size > 1:  # every TP rank must draw the shared noise from the same seed
                t = torch.tensor([seed], dtype=torch.long, device=self.groups.device)
                src = dist.get_global_rank(self.groups.tp_group, 0)
                dist.broadcast(t, src=src, group=self.groups.tp_group)
                seed = int(t.item())
        device = self.groups.device
        shared = torch.Generator(device=device).manual_seed(seed % (1 << 63))
        shard = torch.Generator(device=device).manual_seed(seed_for_rank(seed, self.groups.tp_rank))
        return shared, shard

    def _choose(self, logits, params: SamplingParams, alpha: float, generators):
        """(tokens, log-probs, importance weights or None) on the last stage."""
        shared, shard_gen = generators
        if len(logits) == 2:
            return choose_mixture(
                logits[0], logits[1], params.temperature, alpha, self._shard, shard_gen, shared
            )
        if params.greedy:
            return (*choose_greedy(logits[0], self._shard), None)
        if params.filtered:
            tok_B, lp_B = choose_filtered(
                logits[0],
                params.temperature,
                params.top_k,
                params.top_p,
                self._shard,
                shared,
                self.top_p_candidates,
            )
            return tok_B, lp_B, None
        return (*choose_gumbel(logits[0], params.temperature, self._shard, shard_gen), None)

    def _generate_batch(self, prompts, params: SamplingParams, stages, alpha: float, generators):
        g = self.groups
        device = g.device
        ids_BS, pad_BS = left_pad(prompts, self.pad_id, device)
        b, s = ids_BS.shape
        n = params.max_new_tokens
        for stage in stages:
            stage.prepare(b, s + n)
        padded = bool(pad_BS.any())
        mask = padding_attention_mask(pad_BS) if padded else None
        if padded:
            # Decode steps attend from one query to all keys so far: mask [B, 1, 1, keys], pad keys blocked.
            key_pad_B11K = torch.zeros(b, 1, 1, s + n, dtype=torch.bool, device=device)
            key_pad_B11K[:, 0, 0, :s] = pad_BS
        pos_BS = torch.arange(s, device=device).expand(b, s)
        pos_B1 = torch.empty(b, 1, dtype=torch.long, device=device)

        tokens_BN = torch.full((b, n), self.pad_id, dtype=torch.long, device=device)
        logprobs_BN = torch.zeros(b, n, dtype=torch.float64, device=device)
        weights_BN = torch.ones(b, n, dtype=torch.float64, device=device) if len(stages) == 2 else None
        length_B = torch.zeros(b, dtype=torch.long, device=device)
        done_B = torch.zeros(b, dtype=torch.bool, device=device)
        reason_B = torch.full((b,), _LENGTH, dtype=torch.long, device=device)
        end_T = torch.tensor(self.end_ids, dtype=torch.long, device=device)
        stops = params.stop
        texts_done = [False] * b
        host_tokens: list[list[int]] = [[] for _ in range(b)]

        ids, pos = ids_BS, pos_BS
        for t in range(n):
            logits = [stage.logits(ids, pos, mask) for stage in stages]
            if g.pp_size == 1:  # nothing to broadcast: no packing, no float64 round trip of the tokens
                tok_B, lp_B, w_B = self._choose(logits, params, alpha, generators)
            else:
                chosen_B3 = None
                if g.is_last_stage:
                    tok_B, lp_B, w_B = self._choose(logits, params, alpha, generators)
                    w_B = w_B if w_B is not None else torch.ones_like(lp_B)
                    chosen_B3 = torch.stack([tok_B.double(), lp_B.double(), w_B.double()], dim=-1)
                chosen_B3 = broadcast_from_last_stage(chosen_B3, (b, 3), torch.float64, g)
                tok_B, lp_B, w_B = chosen_B3[:, 0].long(), chosen_B3[:, 1], chosen_B3[:, 2]
            live_B = ~done_B
            tokens_BN[:, t] = tok_B.masked_fill(done_B, self.pad_id)
            logprobs_BN[:, t] = lp_B
            if weights_BN is not None:
                weights_BN[:, t] = w_B
            length_B += live_B
            eos_B = live_B & (tok_B == self.eos_id if len(end_T) == 1 else torch.isin(tok_B, end_T))
            reason_B.masked_fill_(eos_B, _EOS)
            done_B |= eos_B
            if stops:
                self._check_stops(tok_B.tolist(), done_B, reason_B, host_tokens, texts_done, stops)
            if bool(done_B.all()):
                break
            ids = tok_B.unsqueeze(1)
            pos = pos_B1.fill_(s + t)
            if padded:
                mask = key_pad_B11K[..., : s + t + 1]

        lengths = length_B.tolist()
        toks, lps, reasons = tokens_BN.tolist(), logprobs_BN.tolist(), reason_B.tolist()
        ws = weights_BN.tolist() if weights_BN is not None else [[1.0] * n] * b
        return (
            [toks[i][: lengths[i]] for i in range(b)],
            [lps[i][: lengths[i]] for i in range(b)],
            [ws[i][: lengths[i]] for i in range(b)],
            [_REASONS[r] for r in reasons],
        )

    def _check_stops(self, tokens, done_B, reason_B, host_tokens, texts_done, stops) -> None:
        """Finish live rows whose decoded completion now contains a stop string. Every rank decodes the
        same tokens, so every rank reaches the same decision without communicating."""
        done = done_B.tolist()
        for i, tok in enumerate(tokens):
            if texts_done[i]:
                continue
            if done[i]:  # finished by EOS this step (or earlier)
                texts_done[i] = True
                continue
            host_tokens[i].append(tok)
            text = self.tokenizer.decode(host_tokens[i])
            if any(stop in text for stop in stops):
                texts_done[i] = True
                done_B[i] = True
                reason_B[i] = _STOP
