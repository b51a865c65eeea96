"""Built-in domains: formats, verifiers, and deterministic disjoint train/eval splits."""

import random
import re

import pytest

from opd_megatron.config import ConfigError, DataConfig
from opd_megatron.data import (
    DOMAINS,
    DataError,
    PromptRow,
    build_datasets,
    build_split,
    split_of,
    verify,
    write_jsonl,
)
from opd_megatron.data.domains import EVAL_BUCKETS

EXAMPLES = {
    "addition": ("add 123+045=", "0168"),
    "reversal": ("reverse abc=", "cba"),
    "sorting": ("sort 3141=", "1134"),
}


def test_registry():
    assert set(DOMAINS) == {"addition", "reversal", "sorting"}
    assert all(d.name == name for name, d in DOMAINS.items())
    with pytest.raises(ConfigError, match=r"data\.domains\[1\]|domains\[1\]: unknown domain 'nope'"):
        DataConfig(domains=["addition", "nope"])


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_hand_checked_example(name):
    prompt, answer = EXAMPLES[name]
    row = DOMAINS[name].row_for(prompt)
    assert (row.prompt, row.domain, row.reference) == (prompt, name, answer)
    assert row.privileged.endswith(f"answer: {answer}")


def test_privileged_hints():
    assert DOMAINS["addition"].row_for("add 058+067=").privileged == (
        "columns from the right: 8+7=15, 5+6+1=12, 0+0+1=1; answer: 0125"
    )
    assert DOMAINS["reversal"].row_for("reverse abc=").privileged == "from the end: c, b, a; answer: cba"
    assert DOMAINS["sorting"].row_for("sort 3141=").privileged == "counts 1:2, 3:1, 4:1; answer: 1134"


@pytest.mark.parametrize("name", list(DOMAINS))
def test_verifier_accepts_reference_and_rejects_wrong(name):
    domain, rng = DOMAINS[name], random.Random(0)
    for _ in range(100):
        row = domain.generate(rng, 3)
        assert domain.row_for(row.prompt) == row  # the parser agrees with the generator
        assert domain.verify(row, row.reference) and verify(row, f" {row.reference}\n")
        assert domain.verify(row.prompt, row.reference)  # a bare prompt is solved from its text
        wrong = row.reference[:-1] + ("1" if row.reference[-1] != "1" else "2")
        assert not domain.verify(row, wrong) and not verify(row, row.reference + row.reference[-1])
        assert not verify(row, "")


@pytest.mark.parametrize("name", list(DOMAINS))
def test_difficulty_sets_lengths(name):
    rng = random.Random(1)
    rows = [DOMAINS[name].generate(rng, 4) for _ in range(500)]
    body = [r.prompt.split(" ", 1)[1].rstrip("=") for r in rows]
    if name == "addition":
        assert all(len(a) == len(b) == 4 for a, b in (s.split("+") for s in body))
        assert all(len(r.reference) == 5 for r in rows)
        assert {len(str(int(s.split("+")[0]))) for s in body} == {1, 2, 3, 4}
    elif name == "reversal":
        assert {len(s) for s in body} == {1, 2, 3, 4}
    else:
        assert {len(s) for s in body} == {2, 3, 4, 5, 6}


def test_verify_errors():
    with pytest.raises(
        DataError, match="no verifier for domain 'poetry' .*'write a haiku='.*addition, reversal"
    ):
        verify(PromptRow("write a haiku=", "poetry"), "ok")
    with pytest.raises(DataError, match="the sorting verifier got a row of domain 'addition'"):
        DOMAINS["sorting"].verify(PromptRow("sort 12=", "addition"), "12")
    with pytest.raises(
        DataError, match="not a sorting prompt: 'sort 1a=' \\(expected the form 'sort 3141='\\)"
    ):
        DOMAINS["sorting"].verify("sort 1a=", "1")
    # A row's own reference wins over the parser, so hand-written prompts of a domain need not parse.
    assert verify(PromptRow("please add 2 and 2", "addition", reference="4"), "4")


@pytest.mark.parametrize("name", list(DOMAINS))
def test_splits_disjoint_and_deterministic(name):
    train = build_split(name, "train", 300, seed=7, difficulty=3)
    evals = build_split(name, "eval", 100, seed=7, difficulty=3)
    assert len({r.prompt for r in train}) == 300 and len({r.prompt for r in evals}) == 100
    assert not {r.prompt for r in train} & {r.prompt for r in evals}
    assert all(split_of(r.prompt) == "train" for r in train) and all(
        split_of(r.prompt) == "eval" for r in evals
    )
    assert build_split(name, "train", 300, seed=7, difficulty=3) == train
    assert build_split(name, "train", 50, seed=7, difficulty=3) == train[:50]  # size only extends
    assert build_split(name, "train", 300, seed=8, difficulty=3) != train
    # The other seed draws different rows, but never from the other split.
    assert not {r.prompt for r in build_split(name, "eval", 100, seed=8, difficulty=3)} & {
        r.prompt for r in train
    }


def test_split_is_a_fixed_fraction():
    prompts = list(DOMAINS["addition"].enumerate_prompts(2))
    share = sum(split_of(p) == "eval" for p in prompts) / len(prompts)
    assert abs(share - 1 / EVAL_BUCKETS) < 0.01


def test_whole_small_split():
    pool = [p for p in DOMAINS["addition"].enumerate_prompts(1) if split_of(p) == "train"]
    rows = build_split("addition", "train", len(pool), seed=0, difficulty=1)
    assert sorted(r.prompt for r in rows) == sorted(pool)


def test_too_small_space():
    n_eval = sum(split_of(p) == "eval" for p in DOMAINS["addition"].enumerate_prompts(1))
    with pytest.raises(
        DataError,
        match=f"addition at difficulty 1 has only 100 distinct prompts, {n_eval} of them in the eval split, but 50 were asked",
    ):
        build_split("addition", "eval", 50, seed=0, difficulty=1)
    with pytest.raises(
        DataError, match="addition at difficulty 4 has 100000000 prompts, about 10000000 in the eval"
    ):
        build_split("addition", "eval", 5_000_000, seed=0, difficulty=4)
    with pytest.raises(DataError, match="unknown built-in domain 'adition'"):
        build_split("adition", "train", 5, seed=0, difficulty=1)


def test_build_datasets(tmp_path):
    extra_train = [PromptRow("say hi=", "chat", reference="hi")]
    extra_eval = [PromptRow("say yo=", "chat"), PromptRow("add 999+999=", "addition", reference="1998")]
    write_jsonl(tmp_path / "train.jsonl", extra_train)
    write_jsonl(tmp_path / "eval.jsonl", extra_eval)
    cfg = DataConfig(
        domains=["addition", "sorting"],
        train_size=40,
        eval_size=10,
        seed=3,
        train_path=str(tmp_path / "train.jsonl"),
        eval_path=str(tmp_path / "eval.jsonl"),
    )
    train, evals = build_datasets(cfg)
    assert len(train) == 81 and extra_train[0] in train
    assert {r.domain for r in train} == {"addition", "sorting", "chat"}
    assert {"addition", "sorting"} <= {r.domain for r in train[:20]}  # shuffled: domains interleave
    assert {k: len(v) for k, v in evals.items()} == {"addition": 11, "sorting": 10, "chat": 1}
    assert build_datasets(cfg) == (train, evals)


def test_build_datasets_rejects_leaks_and_empty_files(tmp_path):
    leaked = build_split("addition", "train", 5, seed=0, difficulty=3)[2]
    write_jsonl(tmp_path / "eval.jsonl", [leaked])
    cfg = DataConfig(domains=["addition"], train_size=5, eval_size=5, eval_path=str(tmp_path / "eval.jsonl"))
    with pytest.raises(
        DataError,
        match=re.escape(
            f"1 eval prompt(s) also occur in the training rows (first: {tmp_path / 'eval.jsonl'}:1, "
            f"prompt '{leaked.prompt}'"
        ),
    ):
        build_datasets(cfg)
    (tmp_path / "empty.jsonl").write_text("\n")
    cfg = DataConfig(domains=[], train_path=str(tmp_path / "empty.jsonl"))
    with pytest.raises(DataError, match=r"data\.train_path: .*empty\.jsonl holds no rows"):
        build_datasets(cfg)
