"""Held-out evaluation: greedy completions checked by each domain's verifier (exact match)."""

from __future__ import annotations

from opd_megatron.data.domains import verify
from opd_megatron.data.jsonl import PromptRow
from opd_megatron.distributed import ParallelGroups
from opd_megatron.rollout.greedy import greedy_generate


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    ids = tokenizer.encode(prompt)
    return ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + ids


def exact_match(
    model,
    tokenizer,
    rows_by_domain: dict[str, list[PromptRow]],
    groups: ParallelGroups,
    max_new_tokens: int,
    limit: int,
    batch_size: int = 64,
) -> dict[str, float]:
    """Fraction of rows per domain whose greedy completion the verifier accepts (every rank computes the
    same value; generation is collective across TP/PP)."""
    scores = {}
    for domain, rows in rows_by_domain.items():
        rows = rows[:limit]
        correct = 0
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            outs = greedy_generate(
                model,
                [prompt_ids(tokenizer, r.prompt) for r in chunk],
                max_new_tokens,
                tokenizer.eos_id,
                tokenizer.pad_id,
                groups,
            )
            correct += sum(verify(r, tokenizer.decode(o)) for r, o in zip(chunk, outs))
        scores[domain] = correct / max(len(rows), 1)
    return scores
