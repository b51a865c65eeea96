"""MOPD end to end: two domain experts, routing by domain, a remote expert behind the scoring service, a
teacher that fails mid-run, and the checks that run before training starts."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.multirank import run_ranks

DOMAINS = ["reversal", "sorting"]


def _model(layers: int):
    from opd_megatron.config import ModelConfig

    return ModelConfig(
        num_layers=layers, hidden_size=128, num_attention_heads=4, num_query_groups=2, max_sequence_length=32
    )


def _sft_cfg(out: str, domains: list[str], layers: int, steps: int):
    from opd_megatron.config import DataConfig, RunConfig, TrainConfig

    return RunConfig(
        name=f"sft-{'-'.join(domains)}",
        model=_model(layers),
        data=DataConfig(domains=domains, train_size=2000, eval_size=48, difficulty=3),
        train=TrainConfig(
            steps=steps, micro_batch_size=32, lr=2e-3, min_lr=2e-4, warmup_steps=10, eval_every=0,
            eval_samples=16, output_dir=out, progress=False,
        ),
    )  # fmt: skip


def _mopd_cfg(out: str, teachers, warm: str | None, steps: int, mbs: int = 16, **mopd):
    from opd_megatron.config import (
        DataConfig,
        LossConfig,
        MOPDConfig,
        RolloutConfig,
        RunConfig,
        TrainConfig,
    )

    return RunConfig(
        name="mopd",
        model=_model(2),
        teachers=teachers,
        mopd=MOPDConfig(**mopd),
        loss=LossConfig(divergence="reverse_kl"),
        rollout=RolloutConfig(max_new_tokens=8, temperature=1.0),
        data=DataConfig(domains=DOMAINS, train_size=2000, eval_size=48, difficulty=3),
        train=TrainConfig(
            steps=steps, micro_batch_size=mbs, lr=2e-3, min_lr=2e-4, warmup_steps=5, eval_every=0,
            eval_samples=32, output_dir=out, init_checkpoint=warm, resume=False, progress=False,
        ),
    )  # fmt: skip


def _train(rank, root):
    from opd_megatron.train.sft import run_sft

    experts = {d: str(run_sft(_sft_cfg(f"{root}/{d}", [d], 3, 600)).checkpoint) for d in DOMAINS}
    warm = str(run_sft(_sft_cfg(f"{root}/warm", DOMAINS, 2, 60)).checkpoint)
    return experts, warm


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("mopd_experts")
    return run_ranks(_train, 1, timeout=600, args=(str(root),))[0]


def _teachers(experts: dict[str, str], **override):
    from opd_megatron.config import TeacherConfig

    return [
        TeacherConfig(**{"name": f"{d}-expert", "checkpoint": c, "domains": [d], **override.get(d, {})})
        for d, c in experts.items()
    ]


def _routed_run(rank, out, experts, warm):
    from opd_megatron.train.opd import OPDTrainer

    trainer = OPDTrainer(_mopd_cfg(out, _teachers(experts), warm, 150, 32, disagreement_every=20))
    seen = {name: [] for name in trainer.teachers}
    score_mb = trainer.orch.score_microbatch

    def spy(mb):  # the routed scoring of a micro-batch (the disagreement metric scores with every teacher)
        seen[mb.teacher_name] += [r.domain for r in mb.rows]
        return score_mb(mb)

    trainer.orch.score_microbatch = spy
    result = trainer.run()
    return {
        "seen": seen,
        "counters": dict(trainer.orch.rollouts),
        "before": result.eval_before,
        "metrics": [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()],
    }


@pytest.mark.slow
def test_each_rollout_goes_to_its_expert_and_mopd_improves_both_domains(tmp_path, ckpts):
    experts, warm = ckpts
    r = run_ranks(_routed_run, 1, timeout=600, args=(str(tmp_path), experts, warm))[0]
    for d in DOMAINS:
        domains_scored = set(r["seen"][f"{d}-expert"])
        assert domains_scored == {d}, f"{d}-expert scored rollouts of {domains_scored}"
    assert r["counters"]["reversal-expert"] + r["counters"]["sorting-expert"] == 150 * 32
    assert min(r["counters"].values()) > 0.3 * 150 * 32  # both domains are sampled
    evals = [m for m in r["metrics"] if m["kind"] == "eval"]
    first, last = evals[0], evals[-1]
    for d in DOMAINS:  # the held-out reverse KL to each domain's own expert falls
        before, after = first[f"heldout_reverse_kl/{d}"], last[f"heldout_reverse_kl/{d}"]
        assert after < 0.9 * before, f"{d}: held-out KL to its expert went from {before:.3f} to {after:.3f}"
    train = [m for m in r["metrics"] if m["kind"] == "train"]
    assert "teacher_js" in train[0] and 0.0 < train[0]["teacher_js"] <= 0.6932  # <= log 2 for two teachers
    assert train[-1]["teacher/sorting-expert/rollouts"] == r["counters"]["sorting-expert"]
    assert all(abs(m["share_rollout"] + m["share_score"] + m["share_update"] - 1) < 1e-6 for m in train)


def _mixture_and_confidence(rank, out, experts, warm):
    from opd_megatron.train.opd import OPDTrainer

    out_rec = {}
    for routing, extra in (
        ("mixture", {"mixture_weights": "per_token"}),
        ("confidence", {}),
        ("pass_rate", {}),
    ):
        trainer = OPDTrainer(
            _mopd_cfg(f"{out}/{routing}", _teachers(experts), warm, 3, routing=routing, **extra)
        )
        rec = [trainer.train_step(s) for s in range(3)]
        out_rec[routing] = {"rec": rec, "counters": dict(trainer.orch.rollouts)}
        if routing == "pass_rate":
            out_rec[routing]["table"] = trainer.orch.router.table
    return out_rec


@pytest.mark.slow
def test_mixture_confidence_and_pass_rate_routing_train(tmp_path, ckpts):
    experts, warm = ckpts
    r = run_ranks(_mixture_and_confidence, 1, timeout=600, args=(str(tmp_path), experts, warm))[0]
    mix = r["mixture"]
    assert all(not x["skipped"] for x in mix["rec"])
    assert mix["counters"]["reversal-expert"] == mix["counters"]["sorting-expert"] == 3 * 16  # all score all
    assert all(x["teacher_js"] > 0 for x in mix["rec"])
    conf = r["confidence"]
    assert sum(conf["counters"].values()) == 3 * 16 and all(not x["skipped"] for x in conf["rec"])
    # The pass-rate table was measured at start-up: each expert wins its own domain.
    assert r["pass_rate"]["table"] == {d: f"{d}-expert" for d in DOMAINS}


def _remote_run(rank, out, experts, warm, url):
    import torch

    from opd_megatron.mopd import StepAborted  # noqa: F401 (the trainer turns it into a skipped step)
    from opd_megatron.teachers.base import TeacherError
    from opd_megatron.train.opd import OPDTrainer

    teachers = _teachers(
        experts, sorting={"placement": "remote", "url": url, "checkpoint": None, "retries": 1}
    )
    cfg = _mopd_cfg(out, teachers, warm, 10, max_teacher_failures=2)
    cfg.loss.topk = 8
    trainer = OPDTrainer(cfg)
    recs = [trainer.train_step(s) for s in range(2)]
    counters = dict(trainer.orch.rollouts)
    # The service goes away: the step is aborted and the parameters stay exactly as they were.
    Path(out, "stop").write_text("")
    import time

    while Path(out, "stop").exists():
        time.sleep(0.05)
    before = [p.detach().clone() for p in trainer.student.parameters()]
    aborted = trainer.train_step(2)
    unchanged = all(torch.equal(a, p) for a, p in zip(before, trainer.student.parameters()))
    try:
        trainer.train_step(3)
        final = None
    except TeacherError as e:
        final = str(e)
    return recs, counters, aborted, unchanged, final


def test_remote_expert_then_failure_aborts_the_step_cleanly(tmp_path, ckpts):
    import threading

    from opd_megatron.teachers.process import stop_teacher_server
    from tests.teachers.test_server import _start_server

    experts, warm = ckpts
    proc, url = _start_server(
        experts["sorting"], "--max-tokens-per-request", "100000", "--max-body-bytes", "10000000"
    )
    out = tmp_path / "run"
    out.mkdir()

    def stop_when_asked():
        while not (out / "stop").exists():
            threading.Event().wait(0.05)
        stop_teacher_server(proc, 15)
        (out / "stop").unlink()

    threading.Thread(target=stop_when_asked, daemon=True).start()
    try:
        recs, counters, aborted, unchanged, final = run_ranks(
            _remote_run, 1, timeout=600, args=(str(out), experts, warm, url)
        )[0]
    finally:
        stop_teacher_server(proc, 0)
    assert all(not r["skipped"] for r in recs)
    assert counters["sorting-expert"] > 0 and counters["reversal-expert"] > 0
    assert aborted["skipped"] and aborted["teacher"] == "sorting-expert"
    assert unchanged, "an aborted step changed the student"
    assert final is not None and "sorting-expert" in final and "2 consecutive steps aborted" in final


def _bad_config(rank, experts, case, url):
    from opd_megatron.config import ConfigError, TeacherConfig
    from opd_megatron.train.opd import OPDTrainer

    teachers = _teachers(experts)
    extra = {}
    if case == "domain_claimed_twice":
        teachers[1].domains = ["reversal"]
    elif case == "unreachable":
        teachers[1] = TeacherConfig(name="far-expert", placement="remote", url=url, domains=["sorting"])
    elif case == "vocab_mismatch":
        teachers[1].checkpoint = experts["other_vocab"]
    elif case == "mixture_with_remote":
        teachers[1] = TeacherConfig(name="far-expert", placement="remote", url=url)
        extra = {"routing": "mixture"}
    try:
        OPDTrainer(_mopd_cfg("/nonexistent/never-written", teachers, None, 1, **extra))
    except ConfigError as e:
        return str(e)
    return None


def _other_vocab_ckpt(rank, root):
    """A checkpoint whose tokenizer is a locally trained BPE, not the student's characters."""
    from opd_megatron.config import ParallelConfig
    from opd_megatron.distributed import init_distributed
    from opd_megatron.models.checkpoint import save_checkpoint
    from opd_megatron.models.gpt import build_gpt_model
    from opd_megatron.tokenization.train_local import train_tiktoken

    groups = init_distributed(ParallelConfig())
    tok = train_tiktoken(vocab_size=300)
    cfg = _sft_cfg(root, ["sorting"], 1, 1)
    model = build_gpt_model(cfg.model, groups, tok.vocab_size, seed=3, frozen=True)
    return str(save_checkpoint(root, 0, model, groups, config=cfg, tokenizer=tok))


@pytest.mark.parametrize(
    "case, expected",
    [
        ("domain_claimed_twice", r"domain 'reversal' is claimed by teacher 'reversal-expert' and by teacher 'sorting-expert'"),
        ("unreachable", r"teachers\[1\]\.url: teacher 'far-expert': no answer from http://127\.0\.0\.1:\d+/health"),
        ("vocab_mismatch", r"teachers\[1\]\.tokenizer: teacher 'sorting-expert': its checkpoint has a vocabulary of \d+"),
        ("mixture_with_remote", r"teachers\[1\]\.placement: teacher 'far-expert': mixture routing"),
    ],
)  # fmt: skip
def test_misconfigured_teachers_fail_before_training_naming_the_teacher(tmp_path, ckpts, case, expected):
    import re
    import socket

    experts, _ = ckpts
    experts = dict(experts)
    if case == "vocab_mismatch":
        experts["other_vocab"] = run_ranks(_other_vocab_ckpt, 1, timeout=300, args=(str(tmp_path),))[0]
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    message = run_ranks(_bad_config, 1, timeout=300, args=(experts, case, url))[0]
    assert message is not None, f"{case}: no ConfigError"
    assert re.search(expected, message), message
    assert not Path("/nonexistent/never-written").exists()


def test_cli_reports_a_misconfigured_teacher_without_traceback(tmp_path, ckpts):
    import sys

    experts, _ = ckpts
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        "teachers:\n"
        f"  - {{name: a, checkpoint: {experts['reversal']}, domains: [reversal]}}\n"
        f"  - {{name: b, checkpoint: {experts['sorting']}, domains: [reversal]}}\n"
        "model: {num_layers: 2, hidden_size: 128, num_attention_heads: 4, num_query_groups: 2, max_sequence_length: 32}\n"
        f"train: {{output_dir: {tmp_path / 'out'}}}\n"
    )
    r = subprocess.run(
        [sys.executable, "-m", "opd_megatron.cli", "run", str(cfg)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "claimed by teacher 'a' and by teacher 'b'" in r.stderr and "Traceback" not in r.stderr
