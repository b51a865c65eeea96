"""Self-distillation (OPSD): the same weights as teacher, conditioned on the reference answer.

A model is first fine-tuned on *hinted* prompts only (``"<answer>\\n<prompt>"``), where copying the hint
is easy: it then does much better with the hint than without. Self-distilling the hinted view (a frozen
copy of those weights) into the plain view must raise the plain (no-context) accuracy. Measured once:
plain/hinted mean log-prob of the reference -1.12 / -0.10, no-context exact match 0.19 -> 0.71.
"""

from __future__ import annotations

import pytest

from tests.multirank import run_ranks

DOMAIN = "sorting"


def _base(out: str, **train):
    from opd_megatron.config import DataConfig, ModelConfig, RunConfig, TrainConfig

    return RunConfig(
        name="self",
        model=ModelConfig(num_layers=2, hidden_size=128, num_attention_heads=4, max_sequence_length=40),
        data=DataConfig(domains=[DOMAIN], train_size=1500, eval_size=48, difficulty=2),
        train=TrainConfig(
            **{
                "steps": 120,
                "micro_batch_size": 32,
                "lr": 2e-3,
                "min_lr": 2e-4,
                "warmup_steps": 10,
                "eval_every": 0,
                "eval_samples": 48,
                "output_dir": out,
                "progress": False,
                **train,
            }
        ),
    )


HINT_SHARE = 1.0  # the SFT stage only ever sees hinted prompts
SFT_STEPS = 80
OPSD_STEPS = 60


def _pipeline(rank, root):
    import random

    from opd_megatron.config import LossConfig, RolloutConfig, TeacherConfig, load_config
    from opd_megatron.data.domains import build_datasets
    from opd_megatron.data.jsonl import PromptRow, write_jsonl
    from opd_megatron.losses import gather_logprobs
    from opd_megatron.teachers import privileged_prompt
    from opd_megatron.train.opd import OPDTrainer
    from opd_megatron.train.sft import run_sft

    base = _base(f"{root}/sft")
    rows, _ = build_datasets(base.data)
    rng = random.Random(0)
    mixed = [
        PromptRow(
            prompt=privileged_prompt(r) if rng.random() < HINT_SHARE else r.prompt,
            domain=r.domain,
            reference=r.reference,
        )
        for r in rows
    ]
    write_jsonl(f"{root}/hinted.jsonl", mixed)
    sft = load_config(
        None,
        [f"data.train_path={root}/hinted.jsonl", "data.domains=[]", f"train.steps={SFT_STEPS}"],
        base=base,
    )
    ckpt = run_sft(sft).checkpoint

    opd = _base(f"{root}/opsd", steps=OPSD_STEPS, lr=2e-3, init_checkpoint=str(ckpt), warmup_steps=2)
    opd.teachers = [
        TeacherConfig(name="self", placement="self", self_mode="frozen", privileged_source="reference")
    ]
    opd.loss = LossConfig(divergence="forward_kl")
    opd.rollout = RolloutConfig(max_new_tokens=6, temperature=1.0)
    trainer = OPDTrainer(opd)

    # Sanity: the hinted view gives the reference answer a higher log-prob than the plain view.
    eval_rows = trainer.eval_rows[DOMAIN][:32]
    prompts = [trainer.tokenizer.encode(r.prompt) for r in eval_rows]
    prompts = [[trainer.tokenizer.bos_id, *p] for p in prompts]
    comps = [trainer.tokenizer.encode(r.reference) + [trainer.tokenizer.eos_id] for r in eval_rows]
    plain = trainer.scorer.score(eval_rows, prompts, comps)
    hinted = trainer.teacher.score(eval_rows, prompts, comps)
    labels = [t for c in comps for t in c]
    import torch

    idx = torch.tensor(labels).unsqueeze(-1)
    lp_plain = (
        gather_logprobs(plain.logits_NV(), idx, None, 1.0, trainer.student.real_vocab_size).mean().item()
    )
    lp_hinted = (
        gather_logprobs(hinted.logits_NV(), idx, None, 1.0, trainer.student.real_vocab_size).mean().item()
    )
    result = trainer.run()
    return lp_plain, lp_hinted, result.eval_before[DOMAIN], result.eval_after[DOMAIN]


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
    return run_ranks(_pipeline, 1, timeout=600, args=(str(tmp_path_factory.mktemp("self_distill")),))[0]


def test_privileged_view_scores_the_reference_higher(outcome):
    lp_plain, lp_hinted, _, _ = outcome
    assert lp_hinted > lp_plain + 0.3, (lp_plain, lp_hinted)


def test_opsd_raises_no_context_accuracy(outcome):
    _, _, before, after = outcome
    assert after >= before + 0.2, f"no-context exact match went from {before:.2f} to {after:.2f}"
