"""The rollout source's pass@n bookkeeping on crafted samples (counted by hand)."""

from __future__ import annotations

from opd_megatron.config import LossConfig
from opd_megatron.data.domains import build_datasets
from opd_megatron.rollout.types import SamplingParams
from opd_megatron.tokenization.char import CharTokenizer
from opd_megatron.train.rollouts import RolloutSource


def _source(n: int) -> RolloutSource:
    tok = CharTokenizer()
    src = RolloutSource(None, tok, None, LossConfig(), SamplingParams(max_new_tokens=8), seed=0)
    src.samples_per_prompt = n
    return src


def test_pass_counts_group_consecutive_samples_of_one_prompt():
    from opd_megatron.config import DataConfig
    from opd_megatron.data.domains import verify

    rows, _ = build_datasets(DataConfig(domains=["reversal"], train_size=3, eval_size=1, seed=3))
    src = _source(4)
    tok = src.tokenizer
    right = [tok.encode(r.reference) for r in rows]
    wrong = [tok.encode(r.reference + "x") for r in rows]
    assert all(verify(r, tok.decode(c)) for r, c in zip(rows, right))
    assert not any(verify(r, tok.decode(c)) for r, c in zip(rows, wrong))
    # Prompt 0: only its last sample is right; prompt 1: none; prompt 2: the first two.
    group_rows = [rows[i] for i in range(3) for _ in range(4)]
    comps = (
        [wrong[0], wrong[0], wrong[0], right[0]] + [wrong[1]] * 4 + [right[2], right[2], wrong[2], wrong[2]]
    )
    assert src.pass_counts(group_rows, comps) == (2, 3)
    assert _source(1).pass_counts(group_rows, comps) == (0, 0)


def test_rows_of_domains_without_a_verifier_are_not_counted():
    from opd_megatron.data.rows import PromptRow

    src = _source(2)
    rows = [PromptRow("hello", "chat")] * 2
    assert src.pass_counts(rows, [[5], [6]]) == (0, 0)
