"""The OPD loop: it lowers the reverse KL to the teacher, resumes exactly, and never steps on NaN."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.multirank import run_ranks


def _teacher_cfg(out: str):
    from opd_megatron.config import DataConfig, ModelConfig, RunConfig, TrainConfig

    return RunConfig(
        name="teacher",
        model=ModelConfig(num_layers=2, hidden_size=128, num_attention_heads=4, max_sequence_length=32),
        data=DataConfig(domains=["reversal"], train_size=600, eval_size=48, difficulty=3),
        train=TrainConfig(
            steps=200,
            micro_batch_size=32,
            lr=2e-3,
            min_lr=2e-4,
            eval_every=0,
            eval_samples=16,
            output_dir=out,
            progress=False,
        ),
    )


def _student_cfg(out: str, teacher_ckpt: str, **train):
    from opd_megatron.config import (
        DataConfig,
        LossConfig,
        ModelConfig,
        RolloutConfig,
        RunConfig,
        TeacherConfig,
        TrainConfig,
    )

    return RunConfig(
        name="student",
        model=ModelConfig(num_layers=2, hidden_size=96, num_attention_heads=4, max_sequence_length=32),
        teachers=[TeacherConfig(name="expert", checkpoint=teacher_ckpt)],
        loss=LossConfig(divergence="reverse_kl"),
        rollout=RolloutConfig(max_new_tokens=6, temperature=1.0),
        data=DataConfig(domains=["reversal"], train_size=600, eval_size=48, difficulty=3),
        train=TrainConfig(
            **{
                "steps": 60,
                "micro_batch_size": 16,
                "lr": 2e-3,
                "min_lr": 2e-4,
                "warmup_steps": 4,
                "eval_every": 0,
                "eval_samples": 24,
                "output_dir": out,
                "progress": False,
                **train,
            }
        ),
    )


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("opd_teacher")
    return run_ranks(_train_teacher, 1, timeout=500, args=(str(root),))[0]


def _train_teacher(rank, root):
    """The teacher (SFT), and the student's warm start: a short SFT so its first rollouts are not noise."""
    from opd_megatron.train.sft import run_sft

    r = run_sft(_teacher_cfg(f"{root}/teacher"))
    assert r.eval_after["reversal"] > 0.3, r.eval_after
    warm = _student_cfg(f"{root}/warm", "unused", steps=60, lr=2e-3, min_lr=2e-4)
    warm.teachers = []
    return str(r.checkpoint), str(run_sft(warm).checkpoint)


def _opd_run(rank, out, ckpts):
    from opd_megatron.train.opd import run_opd

    teacher, warm = ckpts
    r = run_opd(_student_cfg(out, teacher, init_checkpoint=warm))
    return r.kl_before, r.kl_after, r.skipped_steps


@pytest.mark.slow
def test_opd_lowers_heldout_reverse_kl(tmp_path, teacher_ckpt):
    kl_before, kl_after, skipped = run_ranks(_opd_run, 1, timeout=500, args=(str(tmp_path), teacher_ckpt))[0]
    assert skipped == 0
    assert kl_after < 0.85 * kl_before, f"held-out reverse KL went from {kl_before:.3f} to {kl_after:.3f}"
    assert (tmp_path / "curves.png").stat().st_size > 0
    evals = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 60]
    assert all(0.0 <= r["pass@4/reversal"] <= 1.0 for r in evals)
    assert any((tmp_path / "tensorboard").iterdir())


def _losses(out: str) -> list[float]:
    rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


def _resume(rank, root, ckpts):
    import shutil

    from opd_megatron.train.opd import run_opd

    teacher = ckpts[0]
    straight = Path(root) / "straight"
    run_opd(_student_cfg(str(straight), teacher, steps=6, save_every=3, eval_samples=4))
    resumed = Path(root) / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step_0000003", resumed / "checkpoints" / "step_0000003")
    run_opd(_student_cfg(str(resumed), teacher, steps=6, save_every=3, eval_samples=4))
    return _losses(str(straight)), _losses(str(resumed))


def test_resume_gives_the_same_losses(tmp_path, teacher_ckpt):
    straight, resumed = run_ranks(_resume, 1, timeout=500, args=(str(tmp_path), teacher_ckpt))[0]
    assert len(straight) == 6 and len(resumed) == 3
    assert resumed == pytest.approx(straight[3:], abs=1e-6)


def _nan_and_empty(rank, out, ckpts):
    from opd_megatron.rollout.types import Rollout
    from opd_megatron.train.opd import OPDTrainer

    trainer = OPDTrainer(_student_cfg(out, ckpts[0], steps=3))
    before = [p.detach().clone() for p in trainer.student.parameters()]
    real_score = trainer.teacher.score

    def nan_score(rows, prompts, comps):
        t = real_score(rows, prompts, comps)
        t.hidden_NH[0, 0] = float("nan")
        return t

    trainer.teacher.score = nan_score
    rec_nan = trainer.train_step(0)
    unchanged = all(torch.equal(a, b) for a, b in zip(before, trainer.student.parameters()))
    trainer.teacher.score = real_score

    real_generate = trainer.sampler.generate

    def half_empty(prompts, params, mix_with=None):
        ro = real_generate(prompts, params, mix_with=mix_with)
        n = len(ro.completion_ids) // 2
        return Rollout(
            prompt_ids=ro.prompt_ids,
            completion_ids=[[] for _ in range(n)] + ro.completion_ids[n:],
            logprobs=[[] for _ in range(n)] + ro.logprobs[n:],
            finish_reason=ro.finish_reason,
            importance_weights=None,
        )

    trainer.sampler.generate = half_empty
    rec_empty = trainer.train_step(1)
    changed = not all(torch.equal(a, b) for a, b in zip(before, trainer.student.parameters()))
    return rec_nan, unchanged, rec_empty, changed, dict(trainer.skipped)


def test_nan_teacher_skips_step_and_empty_rollouts_are_counted(tmp_path, teacher_ckpt):
    rec_nan, unchanged, rec_empty, changed, skipped = run_ranks(
        _nan_and_empty, 1, timeout=300, args=(str(tmp_path), teacher_ckpt)
    )[0]
    assert rec_nan["skipped"] and "non-finite" in rec_nan["reason"]
    assert unchanged, "a step with NaN teacher scores changed the parameters"
    assert skipped["nonfinite_teacher"] == 1 and skipped["nonfinite_grad"] == 0
    assert skipped["empty_rollouts"] == 8  # half of the 16 rows came back empty and were dropped
    assert not rec_empty["skipped"] and changed  # the other half trained


VARIANTS = {
    "tinker": ["loss.objective=tinker", "loss.discount=0.5"],
    "minillm-mixed": ["loss.objective=minillm", "loss.mix_alpha=0.3"],
    "gopd": ["loss.objective=gopd", "loss.gopd_lambda=1.5"],
    "aopd": ["loss.objective=aopd", "loss.aopd_topk=4"],
    "rlsd": ["loss.objective=rlsd"],
    "opsd-clip": ["loss.objective=opsd", "loss.opsd_tau=0.5"],
    "gkd-mixed-teacher-samples": [
        "loss.on_policy_lambda=0.5",
        "loss.off_policy_source=teacher",
        "loss.divergence=jsd",
    ],
    "distillm-ramp-skew": [
        "loss.lambda_schedule=linear",
        "loss.lambda_ramp_steps=2",
        "loss.divergence=skew_reverse_kl",
    ],
}


def _variants(rank, root, ckpts):
    """Two steps of every objective / sampling variant: finite losses, real updates."""
    from opd_megatron.config import load_config
    from opd_megatron.train.opd import OPDTrainer

    out = {}
    for name, overrides in VARIANTS.items():
        cfg = load_config(
            None, overrides, base=_student_cfg(f"{root}/{name}", ckpts[0], steps=2, init_checkpoint=ckpts[1])
        )
        trainer = OPDTrainer(cfg)
        before = [p.detach().clone() for p in trainer.student.parameters()]
        recs = [trainer.train_step(0), trainer.train_step(1)]
        moved = any(not torch.equal(a, b) for a, b in zip(before, trainer.student.parameters()))
        out[name] = (recs, moved)
    return out


@pytest.mark.slow
def test_every_objective_and_sampling_variant_trains(tmp_path, teacher_ckpt):
    results = run_ranks(_variants, 1, timeout=500, args=(str(tmp_path), teacher_ckpt))[0]
    assert set(results) == set(VARIANTS)
    for name, (recs, moved) in results.items():
        for rec in recs:
            assert not rec["skipped"], (name, rec)
            assert torch.isfinite(torch.tensor(rec["loss"])), (name, rec)
        assert moved, f"{name}: the parameters did not change"
    assert results["distillm-ramp-skew"][0][0]["lambda"] == 0.0  # off-policy first ...
    assert results["distillm-ramp-skew"][0][1]["lambda"] == 0.5  # ... then ramping towards on-policy


def _samples_per_prompt(rank, out, ckpts):
    from opd_megatron.config import load_config
    from opd_megatron.data.domains import verify
    from opd_megatron.train.opd import OPDTrainer

    cfg = load_config(
        None,
        ["rollout.samples_per_prompt=4"],
        base=_student_cfg(out, ckpts[0], steps=1, init_checkpoint=ckpts[1]),
    )
    trainer = OPDTrainer(cfg)
    calls = []
    real_generate = trainer.sampler.generate

    def spy(prompts, params, mix_with=None):
        ro = real_generate(prompts, params, mix_with=mix_with)
        calls.append((prompts, ro.completion_ids))
        return ro

    trainer.sampler.generate = spy
    rec = trainer.train_step(0)
    (prompts, comps), rows = calls[0], []
    for i in range(0, len(prompts), 4):  # the hand count: a prompt passes if any of its 4 samples verifies
        row = next(r for r in trainer.train_rows if trainer.prompt_fn(r) == prompts[i])
        rows.append(any(verify(row, trainer.tokenizer.decode(c)) for c in comps[i : i + 4]))
    return len(calls), prompts, comps, rec, sum(rows) / len(rows)


def test_samples_per_prompt_samples_each_prompt_n_times_in_one_call_with_pass_at_n(tmp_path, teacher_ckpt):
    n_calls, prompts, comps, rec, hand = run_ranks(
        _samples_per_prompt, 1, timeout=300, args=(str(tmp_path), teacher_ckpt)
    )[0]
    assert n_calls == 1 and len(prompts) == 16  # the batch counts rollouts: 4 prompts x 4 samples
    for i in range(0, 16, 4):
        assert prompts[i] == prompts[i + 1] == prompts[i + 2] == prompts[i + 3]
    assert len({tuple(p) for p in prompts}) == 4
    assert rec["pass@4"] == pytest.approx(hand)
    # Four samples of one prompt are four draws, not one sample repeated.
    assert any(len({tuple(c) for c in comps[i : i + 4]}) > 1 for i in range(0, 16, 4))


def _always_nan(rank, out, ckpts):
    from opd_megatron.teachers.base import TeacherError
    from opd_megatron.train.opd import OPDTrainer

    trainer = OPDTrainer(_student_cfg(out, ckpts[0], steps=6))
    before = [p.detach().clone() for p in trainer.student.parameters()]
    real_score = trainer.teacher.score

    def nan_score(rows, prompts, comps):
        t = real_score(rows, prompts, comps)
        t.hidden_NH.fill_(float("nan"))
        return t

    trainer.teacher.score = nan_score
    recs = []
    try:
        for step in range(6):
            recs.append(trainer.train_step(step))
    except TeacherError as e:
        unchanged = all(torch.equal(a, b) for a, b in zip(before, trainer.student.parameters()))
        return str(e), recs, unchanged, dict(trainer.skipped)
    return None, recs, None, dict(trainer.skipped)


def test_a_teacher_that_stays_non_finite_stops_the_run_naming_it(tmp_path, teacher_ckpt):
    err, recs, unchanged, skipped = run_ranks(
        _always_nan, 1, timeout=300, args=(str(tmp_path), teacher_ckpt)
    )[0]
    assert err is not None, "three non-finite steps in a row did not stop the run"
    assert "'expert'" in err and "3 consecutive steps" in err
    assert len(recs) == 2 and all(r["skipped"] and r["teacher"] == "expert" for r in recs)
    assert unchanged and skipped["nonfinite_teacher"] == 3 and skipped["nonfinite_grad"] == 0


def _packed_vs_padded(rank, root, ckpts):
    from opd_megatron.train.opd import run_opd

    teacher, warm = ckpts
    out = {}
    for pack in (False, True):
        d = f"{root}/pack_{pack}"
        run_opd(_student_cfg(d, teacher, steps=1, eval_samples=4, init_checkpoint=warm, pack_sequences=pack))
        out[pack] = [json.loads(x) for x in Path(d, "metrics.jsonl").read_text().splitlines()]
    return out


def test_packed_sequences_give_the_padded_step(tmp_path, teacher_ckpt):
    """THD packing changes what the decoder computes (no padding), not the step: the first step's loss
    and gradient norm equal the padded run's (same rollouts, same weights)."""
    out = run_ranks(_packed_vs_padded, 1, timeout=400, args=(str(tmp_path), teacher_ckpt))[0]
    padded, packed = ([r for r in out[k] if r["kind"] == "train"][0] for k in (False, True))
    assert padded["padding_fraction"] > 0.1  # there was padding to leave out
    assert (padded["decoder_padding_fraction"], packed["decoder_padding_fraction"]) == (
        padded["padding_fraction"],
        0.0,
    )
    for key in ("loss", "grad_norm"):
        assert packed[key] == pytest.approx(padded[key], rel=1e-5, abs=1e-6), key


def _nan_teacher_every_other_step(rank, out, ckpts):
    """Two teachers; the routing gives step 0, 2, 4, ... to 'a' (always non-finite), the others to 'b'."""
    from opd_megatron.config import MOPDConfig, TeacherConfig
    from opd_megatron.mopd.orchestrator import Group
    from opd_megatron.teachers.base import TeacherError
    from opd_megatron.train.opd import OPDTrainer

    cfg = _student_cfg(out, ckpts[0], steps=8)
    cfg.teachers = [
        TeacherConfig(name="a", checkpoint=ckpts[0], domains=["reversal"]),
        TeacherConfig(name="b", checkpoint=ckpts[0]),
    ]
    cfg.mopd = MOPDConfig(disagreement_every=0)
    trainer = OPDTrainer(cfg)
    real_score = trainer.teachers["a"].score

    def nan_score(rows, prompts, comps):
        t = real_score(rows, prompts, comps)
        t.hidden_NH.fill_(float("nan"))
        return t

    trainer.teachers["a"].score = nan_score
    turn = {"teacher": "a"}
    real_plan = trainer.orch.plan
    trainer.orch.plan = lambda *args: [Group(turn["teacher"], grp.indices) for grp in real_plan(*args)]
    recs = []
    try:
        for step in range(8):
            turn["teacher"] = "a" if step % 2 == 0 else "b"
            recs.append(trainer.train_step(step))
    except TeacherError as e:
        return str(e), recs, dict(trainer.skipped)
    return None, recs, dict(trainer.skipped)


def test_a_nan_teacher_routed_every_other_step_stops_the_run_after_its_own_failures(tmp_path, teacher_ckpt):
    err, recs, skipped = run_ranks(
        _nan_teacher_every_other_step, 1, timeout=300, args=(str(tmp_path), teacher_ckpt)
    )[0]
    assert err is not None, "a teacher non-finite in every step it supervised did not stop the run"
    assert "teacher 'a'" in err and "3 consecutive steps" in err  # steps 1, 3 and 5: its own three
    assert [r["skipped"] for r in recs] == [True, False, True, False]  # 'b' trained in between
    assert [r.get("teacher") for r in recs[::2]] == ["a", "a"]
    assert skipped["nonfinite_teacher"] == 3 and skipped["nonfinite_grad"] == 0


def _cli_last_line(rank, command, cfg_path):
    """``opd-megatron <command> <cfg_path>`` in this process, with one step (index 1) failing: a teacher
    that raises (``run``), or a non-finite loss (``sft``); returns the exit code and stdout."""
    import contextlib
    import io

    from opd_megatron import cli
    from opd_megatron.teachers import MegatronTeacher
    from opd_megatron.teachers.base import TeacherError
    from opd_megatron.train import opd, sft

    failing = {"now": False}
    for cls in (opd.OPDTrainer, sft.SFTRun):

        def step_with_failure(self, step, real=cls.train_step):
            failing["now"] = step == 1
            try:
                return real(self, step)
            finally:
                failing["now"] = False

        cls.train_step = step_with_failure
    real_score, real_loss = MegatronTeacher.score, sft.sft_loss

    def score(self, *args, **kwargs):
        if failing["now"]:
            raise TeacherError(f"teacher {self.name!r}: scoring failed")
        return real_score(self, *args, **kwargs)

    def loss(output, mb):
        total, extra = real_loss(output, mb)
        return (total * float("nan"), extra) if failing["now"] else (total, extra)

    MegatronTeacher.score, sft.sft_loss = score, loss
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main([command, cfg_path])
    return code, out.getvalue()


@pytest.mark.parametrize("command", ["run", "sft"])
def test_the_cli_last_line_counts_the_skipped_steps(tmp_path, teacher_ckpt, command):
    from opd_megatron.config import save_config

    cfg = _student_cfg(str(tmp_path / "out"), teacher_ckpt[0], steps=3, eval_samples=4, eval_pass_k=0)
    if command == "sft":
        cfg.teachers = []
    save_config(cfg, tmp_path / "run.yaml")
    code, stdout = run_ranks(_cli_last_line, 1, timeout=300, args=(command, str(tmp_path / "run.yaml")))[0]
    assert code == 0, stdout
    last = stdout.strip().splitlines()[-1]
    assert last.startswith(f"checkpoint: {tmp_path / 'out' / 'checkpoints' / 'step_0000003'}"), last
    if command == "run":  # the aborted step, by its reason
        assert "1 skipped steps: " in last and "teacher_failures 1" in last and "nonfinite_grad 0" in last, (
            last
        )
    else:
        assert last.endswith("1 skipped steps: nonfinite_grad 1)"), last
