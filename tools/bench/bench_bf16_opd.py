"""bf16 student (fp32 main parameters, Megatron optimizer) vs fp32 student: held-out reverse KL after OPD.

    python tools/bench/bench_bf16_opd.py [--steps 60] --root runs/bench_bf16
    python tools/bench/bench_bf16_opd.py --demo [--seeds 2] --root runs/specialise_then_unify

``--demo``: the main job's models instead: its stage-1 experts and student warm start (trained now unless
``--root`` already holds them, as ``make demo`` leaves them), then its routed MOPD run (the demo's
configuration and step count unless ``--steps``) with an fp32 and a bf16 student, for each seed.

Trains a small reversal-domain teacher (SFT) and a student warm start once, then runs the same OPD job
(same seeds, same data, same teacher in fp32) twice: fp32 student with the torch optimizer, and bf16
student with ``optimizer_impl: megatron`` (fp32 main parameters). Prints the held-out reverse KL before
and after each, and the relative gap of the bf16 run's final KL to the fp32 run's.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path


def _configs(root: Path, steps: int):
    from opd_megatron.config import (
        DataConfig,
        LossConfig,
        ModelConfig,
        RolloutConfig,
        RunConfig,
        TeacherConfig,
        TrainConfig,
    )  # fmt: skip

    data = DataConfig(domains=["reversal"], train_size=600, eval_size=48, difficulty=3)
    teacher = RunConfig(
        name="teacher",
        model=ModelConfig(num_layers=2, hidden_size=128, num_attention_heads=4, max_sequence_length=32),
        data=data,
        train=TrainConfig(steps=200, micro_batch_size=32, lr=2e-3, min_lr=2e-4, eval_every=0,
                          eval_samples=16, output_dir=str(root / "teacher"), progress=False),
    )  # fmt: skip
    student = RunConfig(
        name="student",
        model=ModelConfig(num_layers=2, hidden_size=96, num_attention_heads=4, max_sequence_length=32),
        loss=LossConfig(divergence="reverse_kl"),
        rollout=RolloutConfig(max_new_tokens=6, temperature=1.0),
        data=data,
        train=TrainConfig(steps=60, micro_batch_size=16, lr=2e-3, min_lr=2e-4, warmup_steps=4,
                          eval_every=0, eval_samples=24, eval_pass_k=0, output_dir=str(root / "warm"),
                          progress=False),
    )  # fmt: skip
    return teacher, student, TeacherConfig


def _demo(root: Path, steps: int | None, seeds: int) -> dict:
    """The main job's routed MOPD run, fp32 and bf16 students, on its own stage-1 models."""
    from opd_megatron.recipes import mopd_demo as demo
    from opd_megatron.train.opd import run_opd

    runs = []
    for seed in range(seeds):
        sub = str(root if seed == 0 else root / f"seed{seed}")  # where the demo keeps each seed
        ckpts = {
            label: str(demo.cached_sft(cfg))
            for label, cfg in demo.stage1_configs(sub, demo.DEMO, seed).items()
        }
        experts = demo.expert_teachers({d: ckpts[f"{d}-expert"] for d in demo.DOMAINS})
        base = demo.mopd_config(
            sub, experts, ckpts["student before"], budget=demo.DEMO, seed=seed, steps=steps
        )
        row = {"seed": seed}
        for name, dtype, impl in (("fp32", "fp32", "torch"), ("bf16", "bf16", "megatron")):
            cfg = replace(
                base,
                model=replace(base.model, params_dtype=dtype),
                train=replace(base.train, output_dir=str(root / "bench_bf16" / f"seed{seed}_{name}"),
                              optimizer_impl=impl, progress=False),
            )  # fmt: skip
            r = run_opd(cfg)
            row[name] = {"kl_before": r.kl_before, "kl_after": r.kl_after, "skipped": r.skipped_steps}
            print(f"seed {seed}", name, row[name], flush=True)
        row["relative_gap"] = row["bf16"]["kl_after"] / row["fp32"]["kl_after"] - 1.0
        print(
            f"seed {seed}: bf16 final held-out reverse KL vs fp32: {100 * row['relative_gap']:+.1f}%",
            flush=True,
        )
        runs.append(row)
    mean = {k: sum(r[k]["kl_after"] for r in runs) / len(runs) for k in ("fp32", "bf16")}
    gap = mean["bf16"] / mean["fp32"] - 1.0
    print(
        f"mean over {len(runs)} seed(s): fp32 {mean['fp32']:.4f}, bf16 {mean['bf16']:.4f}, gap {100 * gap:+.1f}%"
    )
    return {"runs": runs, "mean_kl_after": mean, "relative_gap_of_means": gap}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--root", type=Path, default=None)
    ap.add_argument("--demo", action="store_true", help="the main job's models and MOPD run")
    ap.add_argument("--seeds", type=int, default=1, help="--demo: seeds (each has its own stage 1)")
    args = ap.parse_args()
    if args.demo:
        root = args.root or Path("runs/specialise_then_unify")
        out = _demo(root, args.steps, args.seeds)
        (root / "bench_bf16" / "bf16_vs_fp32.json").write_text(json.dumps(out, indent=2))
        return
    args.steps = args.steps or 60
    args.root = args.root or Path("runs/bench_bf16")
    from opd_megatron.models.checkpoint import latest_checkpoint
    from opd_megatron.train.opd import run_opd
    from opd_megatron.train.sft import run_sft

    teacher_cfg, student_cfg, TeacherConfig = _configs(args.root, args.steps)
    t_ckpt = latest_checkpoint(args.root / "teacher" / "checkpoints") or run_sft(teacher_cfg).checkpoint
    w_ckpt = latest_checkpoint(args.root / "warm" / "checkpoints") or run_sft(student_cfg).checkpoint
    results = {}
    for name, dtype, impl in (("fp32", "fp32", "torch"), ("bf16", "bf16", "megatron")):
        cfg = replace(
            student_cfg,
            model=replace(student_cfg.model, params_dtype=dtype),
            teachers=[TeacherConfig(name="expert", checkpoint=str(t_ckpt))],
            train=replace(student_cfg.train, steps=args.steps, init_checkpoint=str(w_ckpt),
                          output_dir=str(args.root / name), optimizer_impl=impl, resume=False),
        )  # fmt: skip
        r = run_opd(cfg)
        results[name] = {"kl_before": r.kl_before, "kl_after": r.kl_after, "skipped": r.skipped_steps}
        print(name, results[name], flush=True)
    gap = results["bf16"]["kl_after"] / results["fp32"]["kl_after"] - 1.0
    print(f"bf16 final held-out reverse KL vs fp32: {100 * gap:+.1f}%")
    (args.root / "bf16_vs_fp32.json").write_text(json.dumps({**results, "relative_gap": gap}, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    main()
