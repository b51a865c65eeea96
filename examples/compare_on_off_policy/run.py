"""Paper-style comparison on one built-in domain with a fixed budget (GKD's lambda axis).

Four ways to train the same small student from the same warm start, each for the same number of steps
and prompts, against the same SFT teacher:

* ``sft-teacher-samples``: cross-entropy on completions the teacher sampled (sequence-level KD);
* ``off-policy KD (lambda=0)``: the divergence on teacher-sampled completions;
* ``mixed (lambda=0.5)``: half student rollouts, half teacher samples;
* ``on-policy KD (lambda=1)``: the divergence on the student's own rollouts.

Reported per seed: held-out exact match and the reverse KL to the teacher on the student's own greedy
completions (where the student will actually be at inference). Usage::

    python examples/compare_on_off_policy/run.py --seeds 1 2 --steps 80 --out runs/compare

Writes ``<out>/results.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

DOMAIN = "sorting"
STUDENT_WIDTH = "model.hidden_size=64"  # teacher: 2 layers x 128; student: 2 layers x 64


def teacher_cfg(root: Path):
    from opd_megatron.config import load_config
    from opd_megatron.recipes.opd_demo import teacher_config

    return load_config(
        None,
        [
            f"data.domains=[{DOMAIN}]",
            f"train.output_dir={root}/teacher",
            "train.steps=400",
            "model.num_layers=2",
        ],
        base=teacher_config(str(root)),
    )


def student_warmup_cfg(root: Path):
    from opd_megatron.config import load_config
    from opd_megatron.recipes.opd_demo import student_warmup_config

    return load_config(
        None,
        [f"data.domains=[{DOMAIN}]", f"train.output_dir={root}/warmup", "train.steps=40", STUDENT_WIDTH],
        base=student_warmup_config(str(root)),
    )


def opd_cfg(root: Path, name: str, seed: int, steps: int, teacher: str, init: str, lam: float):
    from opd_megatron.config import load_config
    from opd_megatron.recipes.opd_demo import opd_config

    return load_config(
        None,
        [
            f"name={name}",
            STUDENT_WIDTH,
            f"data.domains=[{DOMAIN}]",
            f"train.output_dir={root}/{name}/seed{seed}",
            f"train.steps={steps}",
            f"train.seed={seed}",
            "train.eval_every=0",
            f"loss.on_policy_lambda={lam}",
            "loss.off_policy_source=teacher",
            "train.progress=false",
        ],
        base=opd_config(str(root), teacher, init),
    )


def sft_on_teacher_samples(root: Path, seed: int, steps: int, teacher: str, init: str) -> dict:
    """Sample one completion per training prompt from the teacher, then SFT on them."""
    from opd_megatron.data.jsonl import PromptRow, write_jsonl
    from opd_megatron.rollout.sampler import MegatronSampler
    from opd_megatron.rollout.types import SamplingParams
    from opd_megatron.train.evaluate import prompt_ids
    from opd_megatron.train.opd import OPDTrainer

    base = opd_cfg(root, "sft-teacher-samples", seed, steps, teacher, init, 1.0)
    trainer = OPDTrainer(base)
    tok = trainer.tokenizer
    n = steps * base.train.micro_batch_size
    rows = trainer.train_rows[:n]
    sampler = MegatronSampler(
        trainer.teacher.model, trainer.groups, eos_id=tok.eos_id, pad_id=tok.pad_id, tokenizer=tok
    )
    out_rows = []
    for i in range(0, len(rows), 64):
        chunk = rows[i : i + 64]
        ro = sampler.generate(
            [prompt_ids(tok, r.prompt) for r in chunk],
            SamplingParams(max_new_tokens=8, temperature=1.0, seed=seed * 7919 + i),
        )
        for r, c in zip(chunk, ro.completion_ids):
            text = tok.decode([t for t in c if t != tok.eos_id])
            out_rows.append(PromptRow(prompt=r.prompt, domain=r.domain, reference=text))
    path = root / "sft-teacher-samples" / f"seed{seed}" / "teacher_samples.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(path, out_rows)
    from opd_megatron.config import load_config
    from opd_megatron.train.sft import run_sft

    sft = load_config(
        None,
        [
            f"data.train_path={path}",
            "data.domains=[]",
            f"train.init_checkpoint={init}",
            "train.resume=false",
            f"train.output_dir={root}/sft-teacher-samples/seed{seed}/sft",
            "train.progress=false",
            f"train.seed={seed}",
        ],
        base=load_config(None, [f"train.steps={steps}", "train.eval_every=0"], base=student_warmup_cfg(root)),
    )
    ckpt = run_sft(sft).checkpoint
    from opd_megatron.models.checkpoint import load_model_weights

    load_model_weights(ckpt, trainer.student)
    rec = trainer.evaluate()
    return {"exact_match": rec[f"exact_match/{DOMAIN}"], "heldout_reverse_kl": rec["heldout_reverse_kl"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--out", default="runs/compare")
    args = p.parse_args(argv)
    root = Path(args.out)
    from opd_megatron.recipes.mopd_demo import cached_sft
    from opd_megatron.train.opd import run_opd
    from opd_megatron.train.report import print_table

    teacher = str(cached_sft(teacher_cfg(root)))
    init = str(cached_sft(student_warmup_cfg(root)))
    results: dict[str, list[dict]] = {}
    for seed in args.seeds:
        results.setdefault("sft-teacher-samples", []).append(
            sft_on_teacher_samples(root, seed, args.steps, teacher, init)
        )
        for name, lam in (
            ("off-policy KD (lambda=0)", 0.0),
            ("mixed (lambda=0.5)", 0.5),
            ("on-policy KD (lambda=1)", 1.0),
        ):
            slug = name.split(" (")[0].replace(" ", "-") + f"-{lam}"
            r = run_opd(opd_cfg(root, slug, seed, args.steps, teacher, init, lam))
            results.setdefault(name, []).append(
                {
                    "exact_match": r.eval_after[DOMAIN],
                    "heldout_reverse_kl": r.kl_after,
                    "before": r.eval_before[DOMAIN],
                }
            )
    rows = []
    for name, rs in results.items():
        em = [r["exact_match"] for r in rs]
        kl = [r["heldout_reverse_kl"] for r in rs]
        rows.append(
            [
                name,
                " ".join(f"{x:.2f}" for x in em),
                f"{statistics.mean(em):.3f}",
                f"{statistics.mean(kl):.4f}",
            ]
        )
    print_table(
        f"{DOMAIN}: {args.steps} steps each, seeds {args.seeds}",
        ["method", "exact match per seed", "mean exact match", "mean reverse KL (student text)"],
        rows,
    )
    (root / "results.json").write_text(
        json.dumps({"domain": DOMAIN, "steps": args.steps, "seeds": args.seeds, "results": results}, indent=2)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
