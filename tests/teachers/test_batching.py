"""The server's batching worker, with a fake model: concurrent requests share forward passes, bounded by
max_batch, each gets its own k, and a model failure reaches every waiting request."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from opd_megatron.teachers.server import BatchingWorker
from opd_megatron.teachers.topk_scoring import PromptScores


class FakeModel:
    """Scores token t at every position with ids [t, t+1, ...] and log-probs [-1, -2, ...]."""

    def __init__(self, fail: bool = False):
        self.calls: list[int] = []
        self.fail = fail

    def __call__(self, seqs, k):
        self.calls.append(len(seqs))
        if self.fail:
            raise RuntimeError("out of memory (fake)")
        out = []
        for s in seqs:
            n = len(s) - 1
            ids = torch.tensor([[s[0] + j for j in range(k)]] * n, dtype=torch.long).reshape(n, k)
            lps = -torch.arange(1, k + 1, dtype=torch.float32).expand(n, k)
            out.append(PromptScores(ids, lps, torch.zeros(n), torch.ones(n, dtype=torch.long)))
        return out


def _submit_all(worker, jobs):
    results: dict[int, object] = {}

    def one(i, seqs, k):
        try:
            results[i] = worker.submit(seqs, k)
        except Exception as e:  # the test inspects it
            results[i] = e

    threads = [threading.Thread(target=one, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    time.sleep(0.2)  # every job is queued before the worker starts: the batches are deterministic
    worker.start()
    for t in threads:
        t.join(timeout=10)
    worker.stop()
    return results


def test_concurrent_requests_share_bounded_forward_passes():
    model = FakeModel()
    worker = BatchingWorker(model, max_batch=4, max_wait_s=0.05)
    jobs = [
        ([[10, 1, 2]], 3),
        ([[20, 1], [21, 1, 2, 3]], 1),
        ([[30, 5]], 2),
        ([[40, 1], [41, 1], [42, 1]], 2),
    ]
    results = _submit_all(worker, jobs)
    assert sum(model.calls) == 7 and max(model.calls) <= 4 and len(model.calls) < len(jobs)
    for i, (seqs, k) in enumerate(jobs):
        got = results[i]
        assert len(got) == len(seqs)
        for s, sc in zip(seqs, got):
            assert sc.topk_ids_LK.shape == (len(s) - 1, k)  # each request gets its own k
            assert sc.topk_ids_LK[:, 0].eq(s[0]).all()  # and its own sequences' scores
    assert worker.stats["requests"] == 4 and worker.stats["sequences"] == 7


def test_an_oversized_request_is_split_into_several_passes():
    model = FakeModel()
    worker = BatchingWorker(model, max_batch=2, max_wait_s=0.0)
    (got,) = _submit_all(worker, [([[i, 1] for i in range(5)], 1)]).values()
    assert model.calls == [2, 2, 1] and [int(sc.topk_ids_LK[0, 0]) for sc in got] == list(range(5))


def test_a_model_failure_reaches_every_waiting_request():
    worker = BatchingWorker(FakeModel(fail=True), max_batch=8, max_wait_s=0.05)
    results = _submit_all(worker, [([[1, 2]], 1), ([[3, 4]], 1)])
    assert all(isinstance(r, RuntimeError) and "fake" in str(r) for r in results.values())


@pytest.mark.parametrize("k", [0, 1])
def test_k_zero_and_one(k):
    worker = BatchingWorker(FakeModel(), max_batch=8, max_wait_s=0.0).start()
    try:
        (sc,) = worker.submit([[1, 2, 3]], k)
        assert sc.topk_ids_LK.shape == (2, k)
    finally:
        worker.stop()
