"""The main job (``opd-megatron run`` without a config, ``make demo``): specialise, then unify.

Stage 1 (specialise) trains one expert per built-in domain by SFT, and, for the baseline, one generalist
of the same size on all domains with the experts' total step budget, and the student's warm start (a
smaller model, SFT on all domains). Every SFT result is cached under the run root: a second run reuses it.

Stage 2 (unify) distils the experts into the student, four ways on the same prompts, batch, learning rate
and schedule:

- MOPD (routed): the student samples, each rollout goes to the expert of its domain, and the student
  minimises the full-vocabulary reverse KL to that expert on its own tokens;
- off-policy (sequence-level KD): SFT on completions the routed experts sample for the same prompts, with
  more steps so the student spends the same compute (:data:`~opd_megatron.recipes.seqkd.STUDENT_PASSES`);
- a single generalist teacher instead of the experts;
- an equal-weight mixture of all experts instead of routing.

Stage-2 runs resume from their checkpoints: a job stopped in the middle of one (Ctrl-C, a preemption)
continues it where it stopped, and a finished one reports the evaluations it logged.

With ``seeds > 1`` the whole pipeline (stage 1 included) runs once per seed under ``seed<k>/``; the
table gives mean +- std over seeds. The table goes to the console and, with every cell per seed, to
``results.json``; the curves of every run to ``curves.png`` next to it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
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

DOMAINS = ["addition", "reversal", "sorting"]
ROOT = "runs/specialise_then_unify"
OPD_LR = 2e-4


@dataclass(frozen=True)
class Budget:
    """Step counts and evaluation sizes of the demo (the domains and models do not change with it)."""

    expert_steps: int = 600
    warmup_steps: int = 2400
    """The student's SFT warm start on all domains: OPD refines skills the student has but is slow to
    create them (README, OPD section). At 1200 steps the warm start held addition only in part (0.05 to
    0.45 by seed); 2400 steps bring it to 0.73-0.81 (the addition expert: 0.78)."""
    opd_steps: int = 400
    eval_every: int = 100
    eval_samples: int = 64
    train_size: int = 3000
    eval_size: int = 100
    log_every: int = 100

    @property
    def seqkd_steps(self) -> int:
        """Off-policy steps of the same student compute as ``opd_steps`` on-policy ones."""
        from opd_megatron.recipes.seqkd import STUDENT_PASSES

        return round(self.opd_steps * STUDENT_PASSES["opd"] / STUDENT_PASSES["seqkd"])


DEMO = Budget()


def data_config(domains: list[str], budget: Budget = DEMO) -> DataConfig:
    return DataConfig(
        domains=list(domains), train_size=budget.train_size, eval_size=budget.eval_size, difficulty=3
    )


def expert_model() -> ModelConfig:
    return ModelConfig(
        num_layers=3, hidden_size=128, num_attention_heads=4, num_query_groups=2, max_sequence_length=32
    )


def student_model() -> ModelConfig:
    """One layer fewer than an expert."""
    return replace(expert_model(), num_layers=2)


def _sft_train(out: str, steps: int, budget: Budget, seed: int = 0) -> TrainConfig:
    return TrainConfig(
        steps=steps,
        micro_batch_size=32,
        lr=2e-3,
        min_lr=2e-4,
        warmup_steps=10,
        eval_every=0,
        eval_samples=budget.eval_samples,
        log_every=budget.log_every,
        output_dir=out,
        seed=TrainConfig.seed + seed,
    )


def expert_config(root: str, domain: str, budget: Budget = DEMO, seed: int = 0) -> RunConfig:
    return RunConfig(
        name=f"{domain}-expert",
        model=expert_model(),
        data=data_config([domain], budget),
        train=_sft_train(f"{root}/experts/{domain}", budget.expert_steps, budget, seed),
    )


def generalist_config(root: str, budget: Budget = DEMO, seed: int = 0) -> RunConfig:
    """The baseline teacher: an expert-sized model on every domain, with the experts' total SFT steps."""
    steps = budget.expert_steps * len(DOMAINS)
    return RunConfig(
        name="generalist",
        model=expert_model(),
        data=data_config(DOMAINS, budget),
        train=_sft_train(f"{root}/generalist", steps, budget, seed),
    )


def student_warmup_config(root: str, budget: Budget = DEMO, seed: int = 0) -> RunConfig:
    """SFT of the student on all domains: the 'before' point of every distillation run."""
    return RunConfig(
        name="student-warmup",
        model=student_model(),
        data=data_config(DOMAINS, budget),
        train=_sft_train(f"{root}/student_warmup", budget.warmup_steps, budget, seed),
    )


def mopd_config(
    root: str,
    teachers: list[TeacherConfig],
    student_init: str,
    name: str = "mopd",
    routing: str = "specialty",
    budget: Budget = DEMO,
    seed: int = 0,
    steps: int | None = None,
) -> RunConfig:
    """Stage 2: distillation of ``teachers`` into the student (the demo's runs differ only in teachers,
    routing and, for the off-policy run, the number of steps)."""
    return RunConfig(
        name=name,
        model=student_model(),
        teachers=teachers,
        mopd=MOPDConfig(routing=routing, disagreement_every=25),
        loss=LossConfig(divergence="reverse_kl"),
        rollout=RolloutConfig(max_new_tokens=8, temperature=1.0),
        data=data_config(DOMAINS, budget),
        train=TrainConfig(
            steps=steps or budget.opd_steps,
            micro_batch_size=32,
            # A tenth of the SFT rate: at 2e-3 the training reverse KL of a warm-started student rises
            # (0.76 -> 1.4-2.0 nats/token) as the warmup reaches full rate (README, OPD section).
            lr=OPD_LR,
            min_lr=OPD_LR / 10,
            warmup_steps=10,
            eval_every=budget.eval_every,
            eval_samples=budget.eval_samples,
            log_every=budget.log_every,
            output_dir=f"{root}/{name}",
            init_checkpoint=student_init,
            seed=TrainConfig.seed + seed,
        ),
    )


def set_aside_if_changed(cfg: RunConfig) -> Path | None:
    """A stage-2 run resumes from its checkpoints, unless its directory holds a run of another
    configuration (another budget or override): that one is moved to ``<dir>.previous<k>`` (said on the
    console) and the run starts afresh. Returns where it went (None: nothing moved). The global main rank
    decides; the others learn of it from the resume's collective checkpoint search."""
    import os

    import yaml

    from opd_megatron.config import to_dict

    out = Path(cfg.train.output_dir)
    saved = out / "config.yaml"
    if int(os.environ.get("RANK", "0")) != 0 or not (out / "checkpoints").is_dir() or not saved.is_file():
        return None
    try:
        if yaml.safe_load(saved.read_text()) == to_dict(cfg):
            return None
    except yaml.YAMLError:
        pass  # unreadable: not a run this configuration can vouch for
    k = 1
    while out.with_name(f"{out.name}.previous{k}").exists():
        k += 1
    aside = out.with_name(f"{out.name}.previous{k}")
    out.rename(aside)
    print(
        f"{cfg.name}: {out} holds a run of another configuration; moved to {aside}, starting afresh",
        flush=True,
    )
    return aside


def expert_teachers(experts: dict[str, str]) -> list[TeacherConfig]:
    return [TeacherConfig(name=f"{d}-expert", checkpoint=ckpt, domains=[d]) for d, ckpt in experts.items()]


def finished_sft(cfg: RunConfig, quiet: bool = True) -> Path | None:
    """The newest *intact* checkpoint of ``cfg``'s SFT (every file checked against its manifest) when it
    reached ``cfg.train.steps``, else None. Damaged ones are passed over (named on stderr unless
    ``quiet``); with every checkpoint damaged the SFT's resume stops with that error."""
    from opd_megatron.models.checkpoint import CheckpointError, find_resume_checkpoint, read_meta

    root = Path(cfg.train.output_dir) / "checkpoints"
    try:
        found = find_resume_checkpoint(root, **({"report": lambda line: None} if quiet else {}))
    except CheckpointError:
        return None
    return found if found is not None and read_meta(found)["step"] >= cfg.train.steps else None


def cached_sft(cfg: RunConfig) -> Path:
    """The final checkpoint of ``cfg``'s SFT, trained now unless an intact complete one is on disk."""
    from opd_megatron.train.sft import run_sft

    done = finished_sft(cfg, quiet=False)
    if done is not None:
        print(f"{cfg.name}: reusing {done}", flush=True)
        return done
    print(f"{cfg.name}: SFT for {cfg.train.steps} steps", flush=True)
    return run_sft(cfg).checkpoint


def is_cached(cfg: RunConfig) -> bool:
    return finished_sft(cfg) is not None


# ---------------------------------------------------------------------------------------------- the job
MOPD, SEQKD, GENERALIST, AVERAGE = (
    "MOPD (routed experts)",
    "off-policy: SFT on expert samples",
    "single generalist teacher",
    "average of experts",
)
STUDENT_RUNS = [MOPD, SEQKD, GENERALIST, AVERAGE]
RUN_KIND = {MOPD: "opd", SEQKD: "seqkd", GENERALIST: "opd", AVERAGE: "opd"}


def stage1_configs(root: str, budget: Budget, seed: int) -> dict[str, RunConfig]:
    cfgs = {f"{d}-expert": expert_config(root, d, budget, seed) for d in DOMAINS}
    cfgs["generalist"] = generalist_config(root, budget, seed)
    cfgs["student before"] = student_warmup_config(root, budget, seed)
    return cfgs


def stage2_configs(root, budget, seed, ckpts: dict[str, str], path, overrides) -> dict[str, RunConfig]:
    experts = expert_teachers({d: ckpts[f"{d}-expert"] for d in DOMAINS})
    warm = ckpts["student before"]
    generalist = [TeacherConfig(name="generalist", checkpoint=ckpts["generalist"])]
    base = {
        MOPD: mopd_config(root, experts, warm, "mopd", budget=budget, seed=seed),
        SEQKD: mopd_config(root, experts, warm, "seqkd", budget=budget, seed=seed, steps=budget.seqkd_steps),
        GENERALIST: mopd_config(root, generalist, warm, "generalist_opd", budget=budget, seed=seed),
        AVERAGE: mopd_config(root, experts, warm, "averaged_opd", "mixture", budget=budget, seed=seed),
    }
    return {label: load_config(path, overrides, base=cfg) for label, cfg in base.items()}


class Clock:
    """Where the job is and about how long is left, from each run's step count and a per-step cost in
    SFT-step units, calibrated on the steps already run (cached runs cost nothing)."""

    UNIT_COST = {"sft": 1.0, "opd": 2.4, "seqkd": 1.6}
    """Relative cost of one step (an OPD step samples, scores with a teacher, and evaluates more often)."""

    def __init__(self, plan: list[tuple[str, str, int]], seconds_per_unit: float = 0.04):
        self.plan, self.rate, self.t0 = plan, seconds_per_unit, time.monotonic()
        self.done_units, self.spent = 0.0, 0.0
        self.index = 0

    def units(self, kind: str, steps: int) -> float:
        return self.UNIT_COST[kind] * steps

    def start(self, label: str, detail: str) -> None:
        kind, steps = next((k, s) for name, k, s in self.plan[self.index :] if name == label)
        left = sum(self.units(k, s) for _, k, s in self.plan[self.index :]) * self.rate
        print(
            f"\n[{self.index + 1}/{len(self.plan)}] {label}: {detail} ({kind}, {steps} steps) | elapsed "
            f"{_mmss(time.monotonic() - self.t0)}, about {_mmss(left)} left",
            flush=True,
        )
        self._run_start = time.monotonic()

    def finish(self, cached: bool) -> None:
        _, kind, steps = self.plan[self.index]
        if not cached:
            self.done_units += self.units(kind, steps)
            self.spent += time.monotonic() - self._run_start
            self.rate = self.spent / self.done_units
        self.index += 1

    def skip_seed(self, seed: int) -> None:
        """Drop a seed whose results are reused from the plan."""
        self.plan = [p for p in self.plan if not p[0].startswith(f"seed {seed}:")]

    def elapsed(self) -> float:
        return time.monotonic() - self.t0


def _mmss(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def job_plan(roots: list[str], budget: Budget) -> list[tuple[str, str, int]]:
    """(label, kind, steps) of every run, in order; runs already on disk count as zero steps."""
    plan = []
    for seed, root in enumerate(roots):
        for label, cfg in stage1_configs(root, budget, seed).items():
            plan.append((f"seed {seed}: {label}", "sft", 0 if is_cached(cfg) else cfg.train.steps))
        for label in STUDENT_RUNS:
            steps = budget.seqkd_steps if label == SEQKD else budget.opd_steps
            plan.append((f"seed {seed}: {label}", RUN_KIND[label], steps))
    return plan


def print_intro(root: str, seeds: int, budget: Budget) -> None:
    """The first screen: what runs, in which order, and where the results go."""
    print(
        "opd-megatron demo: specialise, then unify (on-policy distillation of several experts into one student)\n"
        f"  stage 1: SFT of one expert per domain ({', '.join(DOMAINS)}; {budget.expert_steps} steps each, 3 "
        f"layers), a generalist baseline, and the student's warm start (2 layers, {budget.warmup_steps} steps)\n"
        f"  stage 2: distil the experts into the student: MOPD (routed, {budget.opd_steps} steps), off-policy "
        f"SFT on the experts' samples ({budget.seqkd_steps} steps, same student compute), and two baselines "
        "(a single generalist teacher, an equal mixture of the experts)\n"
        f"  seeds: {seeds}; checkpoints are cached under {root}/ and reused by the next run\n"
        f"  results: table here and in {root}/{result_name(seeds)}.json, curves in "
        f"{root}/{result_name(seeds).replace('results', 'curves')}.png",
        flush=True,
    )


def run_stage1(root: str, budget: Budget, seed: int, clock: Clock) -> dict[str, str]:
    ckpts = {}
    for label, cfg in stage1_configs(root, budget, seed).items():
        cached = is_cached(cfg)
        clock.start(f"seed {seed}: {label}", "stage 1, SFT" + (", cached" if cached else ""))
        ckpts[label] = str(cached_sft(cfg))
        clock.finish(cached)
    return ckpts


def run_stage2(cfgs: dict[str, RunConfig], seed: int, clock: Clock) -> dict:
    """Every student run; returns their results and the MOPD run's trainer (teachers, eval rows)."""
    from opd_megatron.recipes.seqkd import SeqKDTrainer
    from opd_megatron.train.opd import OPDTrainer

    results, trainers = {}, {}
    for label, cfg in cfgs.items():
        clock.start(f"seed {seed}: {label}", f"stage 2, into {cfg.train.output_dir}")
        set_aside_if_changed(cfg)
        trainer = (SeqKDTrainer if RUN_KIND[label] == "seqkd" else OPDTrainer)(cfg)
        results[label], trainers[label] = trainer.run(), trainer
        clock.finish(False)
    return {"results": results, "trainers": trainers}


def teacher_scores(trainers: dict) -> dict[str, dict[str, float]]:
    """Held-out exact match of every teacher, with the students' tokenizer, split and generation length."""
    from opd_megatron.train.evaluate import exact_match

    tr = trainers[MOPD]
    models = {name: t.model for name, t in tr.teachers.items()}
    models["generalist"] = trainers[GENERALIST].teachers["generalist"].model
    n, limit = tr.cfg.rollout.max_new_tokens, tr.cfg.train.eval_samples
    return {
        name: exact_match(m, tr.tokenizer, tr.eval_rows, tr.groups, n, limit) for name, m in models.items()
    }


def run_seed(root: str, budget: Budget, seed: int, clock: Clock, path, overrides) -> dict:
    """One seed of the whole pipeline: ``{column: {domain: exact match}}`` and the student runs' dirs.
    A finished seed leaves ``seed_result.json``; a later job of the same budget and overrides reuses it."""
    from opd_megatron.train.report import write_json

    done = Path(root) / "seed_result.json"
    key = {"budget": asdict(budget), "config": path, "overrides": list(overrides), "seed": seed}
    if done.exists() and json.loads(done.read_text()).get("key") == key:
        print(f"seed {seed}: reusing {done}", flush=True)
        clock.skip_seed(seed)
        return json.loads(done.read_text())
    out = _run_seed(root, budget, seed, clock, path, overrides)
    write_json({"key": key, **out}, done)
    return out


def _run_seed(root: str, budget: Budget, seed: int, clock: Clock, path, overrides) -> dict:
    ckpts = run_stage1(root, budget, seed, clock)
    cfgs = stage2_configs(root, budget, seed, ckpts, path, overrides)
    out = run_stage2(cfgs, seed, clock)
    results, trainers = out["results"], out["trainers"]
    cells = teacher_scores(trainers)
    cells["student before"] = results[MOPD].eval_before
    cells.update({label: results[label].eval_after for label in STUDENT_RUNS})
    counts = ", ".join(f"{n}: {c}" for n, c in trainers[MOPD].orch.rollouts.items())
    print(f"seed {seed}: rollouts per teacher in the MOPD run: {counts}", flush=True)
    return {
        "cells": cells,
        "run_dirs": {label: cfg.train.output_dir for label, cfg in cfgs.items()},
        "steps": {label: cfg.train.steps for label, cfg in cfgs.items()},
        "batch": cfgs[MOPD].train.micro_batch_size,
    }


def run_mopd_demo(
    path: str | None, overrides: list[str], root: str = ROOT, seeds: int = 1, budget: Budget = DEMO
) -> int:
    from opd_megatron.train.report import demo_results, print_demo_table, write_json

    print_intro(root, seeds, budget)
    roots = [root if seeds == 1 else f"{root}/seed{k}" for k in range(seeds)]
    clock = Clock(job_plan(roots, budget))
    per_seed = [run_seed(r, budget, k, clock, path, overrides) for k, r in enumerate(roots)]
    columns = [f"{d}-expert" for d in DOMAINS] + ["generalist", "student before", *STUDENT_RUNS]
    table = demo_results(per_seed, columns, DOMAINS)
    table.update(budget=asdict(budget), seeds=seeds, wall_s=round(clock.elapsed(), 1))
    print_demo_table(table, f"Specialise then unify: held-out exact match per domain ({seeds} seed(s))")
    stem = Path(root) / result_name(seeds)
    png = plot_demo(per_seed, stem.with_suffix(".png").with_stem(stem.stem.replace("results", "curves")))
    out = write_json(table, stem.with_suffix(".json"))
    print(f"wall time {clock.elapsed():.0f}s; table: {out}, curves: {png}", flush=True)
    return 0


def result_name(seeds: int) -> str:
    """``results`` for one seed, ``results_<n>seeds`` otherwise (a one-seed run keeps a many-seed table)."""
    return "results" if seeds == 1 else f"results_{seeds}seeds"


def plot_demo(per_seed: list[dict], out: Path) -> Path:
    from opd_megatron.recipes.seqkd import STUDENT_PASSES
    from opd_megatron.train.plots import plot_runs

    runs = {label: [Path(s["run_dirs"][label]) for s in per_seed] for label in STUDENT_RUNS}
    # Student compute of one step, in thousands of sequence forward passes.
    per_step = {label: per_seed[0]["batch"] * STUDENT_PASSES[RUN_KIND[label]] / 1e3 for label in STUDENT_RUNS}
    return plot_runs(runs, per_step, DOMAINS, out)
