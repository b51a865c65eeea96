"""The main job (``opd-megatron run`` without a config, ``make demo``): specialise, then unify.

Stage 1 (specialise) trains one expert per built-in domain by SFT, and, for the baseline, one generalist
of the same size on all domains with the experts' total step budget. Every SFT result is cached under
the run root: a second run reuses it.

Stage 2 (unify) distils the experts on-policy into one smaller student, warm-started by a short SFT:
the student samples, each rollout is routed by its domain label to its expert, and the student minimises
the full-vocabulary reverse KL to that expert on its own tokens. Two baselines run on the same budget
(steps, batch, learning rate): distilling the single generalist teacher, and mixing all experts with
equal weights instead of routing. The table gives held-out exact match per domain for every model; the
curves of the three student runs go to one PNG.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from opd_megatron.config import (
    DataConfig,
    LossConfig,
    ModelConfig,
    MOPDConfig,
    RolloutConfig,
    RunConfig,
    TeacherConfig,
    TrainConfig,
    load_config,
)
from opd_megatron.models.checkpoint import latest_checkpoint, read_meta

DOMAINS = ["addition", "reversal", "sorting"]
EXPERT_STEPS = 600
ROOT = "runs/specialise_then_unify"


def data_config(domains: list[str]) -> DataConfig:
    return DataConfig(domains=list(domains), train_size=3000, eval_size=100, difficulty=3)


def expert_model() -> ModelConfig:
    return ModelConfig(
        num_layers=3, hidden_size=128, num_attention_heads=4, num_query_groups=2, max_sequence_length=32
    )


def student_model() -> ModelConfig:
    """One layer fewer than an expert."""
    return replace(expert_model(), num_layers=2)


def _sft_train(out: str, steps: int, log_every: int = 100) -> TrainConfig:
    return TrainConfig(
        steps=steps,
        micro_batch_size=32,
        lr=2e-3,
        min_lr=2e-4,
        warmup_steps=10,
        eval_every=0,
        eval_samples=64,
        log_every=log_every,
        output_dir=out,
    )


def expert_config(root: str, domain: str) -> RunConfig:
    return RunConfig(
        name=f"{domain}-expert",
        model=expert_model(),
        data=data_config([domain]),
        train=_sft_train(f"{root}/experts/{domain}", EXPERT_STEPS),
    )


def generalist_config(root: str) -> RunConfig:
    """The baseline teacher: an expert-sized model on every domain, with the experts' total SFT steps."""
    return RunConfig(
        name="generalist",
        model=expert_model(),
        data=data_config(DOMAINS),
        train=_sft_train(f"{root}/generalist", EXPERT_STEPS * len(DOMAINS), log_every=300),
    )


def student_warmup_config(root: str) -> RunConfig:
    """A brief SFT of the student on all domains: the 'before' point of every distillation run."""
    return RunConfig(
        name="student-warmup",
        model=student_model(),
        data=data_config(DOMAINS),
        train=_sft_train(f"{root}/student_warmup", 150, log_every=50),
    )


def mopd_config(
    root: str,
    teachers: list[TeacherConfig],
    student_init: str,
    name: str = "mopd",
    routing: str = "specialty",
) -> RunConfig:
    """Stage 2: on-policy distillation of ``teachers`` into the student (the demo's three runs differ
    only in teachers and routing)."""
    return RunConfig(
        name=name,
        model=student_model(),
        teachers=teachers,
        mopd=MOPDConfig(routing=routing, disagreement_every=25),
        loss=LossConfig(divergence="reverse_kl"),
        rollout=RolloutConfig(max_new_tokens=8, temperature=1.0),
        data=data_config(DOMAINS),
        train=TrainConfig(
            steps=400,
            micro_batch_size=32,
            lr=2e-3,
            min_lr=2e-4,
            warmup_steps=10,
            eval_every=100,
            eval_samples=64,
            log_every=20,
            output_dir=f"{root}/{name}",
            init_checkpoint=student_init,
            resume=False,
        ),
    )


def expert_teachers(experts: dict[str, str]) -> list[TeacherConfig]:
    return [TeacherConfig(name=f"{d}-expert", checkpoint=ckpt, domains=[d]) for d, ckpt in experts.items()]


def cached_sft(cfg: RunConfig) -> Path:
    """The final checkpoint of ``cfg``'s SFT, trained now unless a complete one is already on disk."""
    from opd_megatron.train.sft import run_sft

    latest = latest_checkpoint(Path(cfg.train.output_dir) / "checkpoints")
    if latest is not None and read_meta(latest)["step"] >= cfg.train.steps:
        print(f"{cfg.name}: reusing {latest}", flush=True)
        return latest
    print(f"{cfg.name}: SFT for {cfg.train.steps} steps", flush=True)
    return run_sft(cfg).checkpoint


def _plot(runs: dict[str, Path], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from opd_megatron.train.metrics import read_metrics

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, run_dir in runs.items():
        evals = read_metrics(run_dir / "metrics.jsonl", "eval")
        pts = [
            (r["step"], sum(v for k, v in r.items() if k.startswith("exact_match/")) / len(DOMAINS))
            for r in evals
        ]
        axes[0].plot(*zip(*pts), marker="o", label=label)
        train = [
            r for r in read_metrics(run_dir / "metrics.jsonl", "train") if isinstance(r.get("loss"), float)
        ]
        axes[1].plot([r["step"] for r in train], [r["kl_per_token"] for r in train], label=label)
    axes[0].set(title="student: mean held-out exact match", xlabel="step", ylim=(-0.02, 1.02))
    axes[1].set(title="training KL per token (to each run's target)", xlabel="step", yscale="log")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def run_mopd_demo(path: str | None, overrides: list[str], root: str = ROOT) -> int:
    from opd_megatron.train.evaluate import exact_match
    from opd_megatron.train.opd import OPDTrainer
    from opd_megatron.train.report import print_table

    t0 = time.monotonic()
    print(
        f"stage 1 (specialise): one expert per domain {DOMAINS}, a generalist baseline, a student warm start"
    )
    experts = {d: str(cached_sft(expert_config(root, d))) for d in DOMAINS}
    generalist = str(cached_sft(generalist_config(root)))
    warm = str(cached_sft(student_warmup_config(root)))
    t_stage1 = time.monotonic() - t0

    print("stage 2 (unify): on-policy distillation of the experts into the student, and two baselines")
    runs = {
        "MOPD (routed experts)": load_config(
            path, overrides, base=mopd_config(root, expert_teachers(experts), warm)
        ),
        "single generalist teacher": load_config(
            path,
            overrides,
            base=mopd_config(
                root, [TeacherConfig(name="generalist", checkpoint=generalist)], warm, "generalist_opd"
            ),
        ),
        "average of experts": load_config(
            path, overrides, base=mopd_config(root, expert_teachers(experts), warm, "averaged_opd", "mixture")
        ),
    }
    results, trainers = {}, {}
    for label, cfg in runs.items():
        print(f"-- {label}: {cfg.train.steps} steps", flush=True)
        trainer = OPDTrainer(cfg)
        results[label], trainers[label] = trainer.run(), trainer

    # Teachers' own scores, with the trainers' tokenizer and held-out split.
    tr = trainers["MOPD (routed experts)"]
    limit = tr.cfg.train.eval_samples
    em = {
        name: exact_match(
            t.model, tr.tokenizer, tr.eval_rows, tr.groups, tr.cfg.rollout.max_new_tokens, limit
        )
        for name, t in tr.teachers.items()
    }
    g = trainers["single generalist teacher"].teachers["generalist"]
    em["generalist"] = exact_match(
        g.model, tr.tokenizer, tr.eval_rows, tr.groups, tr.cfg.rollout.max_new_tokens, limit
    )
    mopd = results["MOPD (routed experts)"]
    columns = [*(f"{d}-expert" for d in DOMAINS), "generalist", "student before", *runs]
    rows = []
    for d in DOMAINS:
        rows.append(
            [d]
            + [f"{em[c][d]:.2f}" for c in columns[: len(DOMAINS) + 1]]
            + [f"{mopd.eval_before[d]:.2f}"]
            + [f"{results[label].eval_after[d]:.2f}" for label in runs]
        )
    mean = lambda scores: sum(scores[d] for d in DOMAINS) / len(DOMAINS)  # noqa: E731
    rows.append(
        ["mean"]
        + [f"{mean(em[c]):.2f}" for c in columns[: len(DOMAINS) + 1]]
        + [f"{mean(mopd.eval_before):.2f}"]
        + [f"{mean(results[label].eval_after):.2f}" for label in runs]
    )
    print_table("Specialise then unify: held-out exact match per domain", ["domain", *columns], rows)
    counts = ", ".join(f"{n}: {c}" for n, c in tr.orch.rollouts.items())
    print(f"rollouts per teacher in the MOPD run: {counts}")
    png = _plot({label: Path(cfg.train.output_dir) for label, cfg in runs.items()}, Path(root) / "curves.png")
    n_e = sum(p.numel() for p in next(iter(tr.teachers.values())).model.parameters())
    n_s = sum(p.numel() for p in tr.student.parameters())
    wall = time.monotonic() - t0
    print(
        f"expert {n_e:,} parameters each, student {n_s:,}; wall time {wall:.0f}s (stage 1 {t_stage1:.0f}s); "
        f"curves: {png}"
    )
    return 0
