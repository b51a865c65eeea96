"""The end-to-end CPU demo behind ``make demo``: the *specialise* stage of specialise-then-unify.

One expert per built-in domain is trained by SFT from the same base config (``examples/specialise/
expert.yaml`` holds the same settings as a file), each cached under ``runs/demo/experts/<domain>``: a
second ``make demo`` reuses finished experts. The table shows every expert's held-out exact match on
every domain, before and after its training, so the specialisation is visible: each expert is strong on
its own domain only.
"""

from __future__ import annotations

import time
from pathlib import Path

from opd_megatron.config import DataConfig, ModelConfig, RunConfig, TrainConfig, load_config
from opd_megatron.models.checkpoint import latest_checkpoint, read_meta

DEMO_DOMAINS = ("reversal", "sorting", "addition")


def expert_config(domain: str, root: str = "runs/demo") -> RunConfig:
    """A small Llama-style expert (~0.4M parameters) trained on one domain for a few hundred steps."""
    return RunConfig(
        name=f"expert-{domain}",
        model=ModelConfig(
            num_layers=2, hidden_size=128, num_attention_heads=4, num_query_groups=2, max_sequence_length=32
        ),
        data=DataConfig(domains=list(DEMO_DOMAINS), train_size=3000, eval_size=100, difficulty=3),
        train=TrainConfig(
            steps=400,
            micro_batch_size=32,
            lr=2e-3,
            min_lr=2e-4,
            warmup_steps=20,
            eval_every=0,
            eval_samples=100,
            log_every=50,
            output_dir=f"{root}/experts/{domain}",
        ),
    )


def _load(cfg: RunConfig, ckpt):
    from opd_megatron.distributed import init_distributed
    from opd_megatron.models.checkpoint import load_model_weights
    from opd_megatron.models.gpt import build_gpt_model
    from opd_megatron.tokenization import load_tokenizer

    groups = init_distributed(cfg.parallel, cfg.train.seed)
    tokenizer = load_tokenizer(cfg.tokenizer)
    model = build_gpt_model(cfg.model, groups, tokenizer.vocab_size)
    load_model_weights(ckpt, model)
    return model, tokenizer, groups


def run_demo(path: str | None, overrides: list[str]) -> int:
    from opd_megatron.data.domains import build_datasets
    from opd_megatron.train.evaluate import exact_match
    from opd_megatron.train.report import print_table
    from opd_megatron.train.sft import run_sft

    t0 = time.monotonic()
    rows = []
    for domain in DEMO_DOMAINS:
        cfg = load_config(path, overrides, base=expert_config(domain))
        # Each expert trains on its own domain and is evaluated on all of the config's domains.
        train_cfg = load_config(None, [f"data.domains=[{domain}]"], base=cfg)
        latest = latest_checkpoint(Path(train_cfg.train.output_dir) / "checkpoints")
        before: dict[str, float] = {}
        if latest is not None and read_meta(latest)["step"] >= train_cfg.train.steps:
            print(f"expert {domain}: reusing {latest}", flush=True)
            ckpt = latest
        else:
            print(f"expert {domain}: training {train_cfg.train.steps} steps", flush=True)
            result = run_sft(train_cfg)
            before, ckpt = result.eval_before, result.checkpoint
        model, tokenizer, groups = _load(train_cfg, ckpt)
        _, eval_rows = build_datasets(cfg.data)
        after = exact_match(
            model, tokenizer, eval_rows, groups, max_new_tokens=8, limit=cfg.train.eval_samples
        )
        for d in cfg.data.domains:
            b = before.get(d)
            rows.append([f"expert-{domain}", d, "-" if b is None else f"{b:.2f}", f"{after[d]:.2f}"])
    print_table(
        "Specialise stage: held-out exact match of each domain expert",
        ["expert", "eval domain", "before SFT", "after SFT"],
        rows,
    )
    print(f"demo wall time: {time.monotonic() - t0:.0f}s; experts under runs/demo/experts/")
    return 0
