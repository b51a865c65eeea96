"""MetricsLogger on resume: records after the resumed step move to a side file, none is duplicated."""

from __future__ import annotations

import json

import pytest

from opd_megatron.train.metrics import DISCARDED_NAME, MetricsLogger, read_metrics, truncate_metrics


def _run(out, steps, resume_step=None):
    log = MetricsLogger(out, tensorboard=False, resume_step=resume_step)
    for s in steps:
        log.log("train", s, {"loss": float(s)})
        if s % 2 == 0:
            log.log("eval", s, {"acc": 0.5})
    log.close()
    return log


def test_resume_keeps_records_up_to_the_step_and_moves_the_tail(tmp_path):
    _run(tmp_path, range(1, 6))  # killed after logging step 5; the last checkpoint is at step 3
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"kind": "train", "step": 6, "lo')  # a line torn by the kill
    log = _run(tmp_path, range(4, 7), resume_step=3)
    assert log.discarded == 4  # train 4, eval 4, train 5 and the torn line
    steps = [(r["kind"], r["step"]) for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert steps == [("train", 1), ("train", 2), ("eval", 2), ("train", 3),
                     ("train", 4), ("eval", 4), ("train", 5), ("train", 6), ("eval", 6)]  # fmt: skip
    side = (tmp_path / DISCARDED_NAME).read_text().splitlines()
    assert [json.loads(x)["step"] for x in side[:3]] == [4, 4, 5] and side[3].startswith('{"kind": "train"')
    assert len(side) == 4


def test_truncate_is_a_no_op_when_nothing_is_after_the_step(tmp_path):
    _run(tmp_path, range(1, 4))
    before = (tmp_path / "metrics.jsonl").read_text()
    assert truncate_metrics(tmp_path / "metrics.jsonl", 3) == 0
    assert (tmp_path / "metrics.jsonl").read_text() == before
    assert not (tmp_path / DISCARDED_NAME).exists()
    assert truncate_metrics(tmp_path / "missing.jsonl", 3) == 0


def test_resume_at_step_zero_discards_everything_and_appends_to_the_side_file(tmp_path):
    _run(tmp_path, range(1, 3))
    (tmp_path / DISCARDED_NAME).write_text('{"kind": "train", "step": 9}\n')  # an earlier discard stays
    log = _run(tmp_path, [1], resume_step=0)
    assert log.discarded == 3
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1]
    assert [json.loads(x)["step"] for x in (tmp_path / DISCARDED_NAME).read_text().splitlines()] == [
        9,
        1,
        2,
        2,
    ]


def test_plain_resume_appends_and_a_fresh_run_overwrites(tmp_path):
    _run(tmp_path, [1, 2])
    log = MetricsLogger(tmp_path, tensorboard=False, resume=True)
    log.log("train", 3, {})
    log.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 2, 3]
    _run(tmp_path, [1])
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1]
    with pytest.raises(ValueError, match="resume_step must be >= 0"):
        MetricsLogger(tmp_path, tensorboard=False, resume_step=-1)
