"""RemoteTeacher under tensor parallelism: one request per TP group (rank 0 asks, its peer receives the
broadcast), and a failure reaches both ranks instead of leaving one waiting."""

from __future__ import annotations

from tests.multirank import run_ranks
from tests.teachers.stub import stub_server


def _score_tp2(rank, url):
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist

    from opd_megatron.teachers import RemoteTeacher, RemoteTeacherClient, TeacherError

    # RemoteTeacher only needs the TP group of its rank: a plain two-rank gloo world, no Megatron.
    dist.init_process_group("gloo")
    groups = SimpleNamespace(
        tp_group=dist.group.WORLD, tp_rank=rank, tp_size=2, is_last_stage=True, device=torch.device("cpu")
    )
    client = RemoteTeacherClient(url, "tp-teacher", timeout_s=10, retries=0, model="m")
    targets = RemoteTeacher(client, k=1, groups=groups).score([None] * 2, [[1, 2], [1]], [[3, 4], [5]])
    down = RemoteTeacherClient("http://127.0.0.1:1", "down-teacher", timeout_s=2, retries=0, model="m")
    try:
        RemoteTeacher(down, k=1, groups=groups).score([None], [[1]], [[2]])
        error = None
    except TeacherError as e:
        error = str(e)
    return targets.topk_ids_NK, client.attempts, error


def test_tp_peers_share_one_request_and_one_failure():
    srv, handler = stub_server("ok")
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        (ids0, attempts0, err0), (ids1, attempts1, err1) = run_ranks(_score_tp2, 2, timeout=180, args=(url,))
    finally:
        srv.shutdown()
        srv.server_close()
    assert handler.hits == 1 and (attempts0, attempts1) == (1, 0)
    assert ids0.tolist() == ids1.tolist() == [[3], [4], [5]]
    assert err0 == err1 and "'down-teacher'" in err0
