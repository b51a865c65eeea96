"""Supervised fine-tuning: the *specialise* stage that builds each domain expert.

Trains a Megatron GPTModel on ``prompt -> reference`` pairs (loss on completion tokens only), with AdamW,
warmup + cosine schedule, gradient clipping, gradient accumulation, data parallelism, periodic held-out
exact-match evaluation per domain, atomic checkpoints and exact resume.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from opd_megatron.config import RunConfig, save_config
from opd_megatron.data.batching import collate, encode_sft_example
from opd_megatron.data.domains import build_datasets
from opd_megatron.distributed import ParallelGroups, init_distributed
from opd_megatron.models.checkpoint import (
    latest_checkpoint,
    load_model_weights,
    load_rank_state,
    read_meta,
    save_checkpoint,
)
from opd_megatron.models.gpt import build_gpt_model, num_parameters
from opd_megatron.tokenization import load_tokenizer
from opd_megatron.train.evaluate import exact_match
from opd_megatron.train.metrics import MetricsLogger, Progress
from opd_megatron.train.optim import build_optimizer, lr_at, set_lr
from opd_megatron.train.preemption import PreemptionHandler
from opd_megatron.train.step import forward_backward, optimizer_step


@dataclass
class SFTResult:
    step: int
    final_loss: float
    eval_before: dict[str, float]
    eval_after: dict[str, float]
    checkpoint: Path
    wall_s: float


class DataCursor:
    """Deterministic epoch-wise shuffling; the position is two integers, so resume is exact."""

    def __init__(self, n: int, seed: int, epoch: int = 0, offset: int = 0):
        self.n, self.seed, self.epoch, self.offset = n, seed, epoch, offset
        self._perm = self._permutation(epoch)

    def _permutation(self, epoch: int) -> list[int]:
        perm = list(range(self.n))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(perm)
        return perm

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.offset == self.n:
                self.epoch, self.offset = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
            take = min(k - len(out), self.n - self.offset)
            out.extend(self._perm[self.offset : self.offset + take])
            self.offset += take
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}


def pad_batch(batch: dict, width: int, pad_id: int, device) -> dict:
    """Right-pad a collated batch to ``width`` columns (pipeline stages exchange fixed shapes)."""
    out = {}
    for k, v in batch.items():
        if v.ndim == 2 and v.shape[1] < width:
            fill = 0 if k == "loss_mask" else pad_id
            v = torch.cat([v, v.new_full((v.shape[0], width - v.shape[1]), fill)], dim=1)
        out[k] = v.to(device)
    return out


def sft_loss(output, mb):
    """Cross-entropy summed over completion tokens (Megatron's vocab-parallel CE gives ``[b, s]``)."""
    mask = mb["loss_mask"].float()
    return (output.float() * mask).sum(), {"tokens": mask.sum()}


def sft_forward(model, mb):
    tokens = mb["tokens"]
    pos = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    return model(tokens, pos, None, labels=mb["labels"])


def run_sft(cfg: RunConfig, groups: ParallelGroups | None = None) -> SFTResult:
    t_start = time.monotonic()
    groups = groups or init_distributed(cfg.parallel, cfg.train.seed)
    tc = cfg.train
    out_dir = Path(tc.output_dir)
    ckpt_root = out_dir / "checkpoints"
    tokenizer = load_tokenizer(cfg.tokenizer)
    train_rows, eval_rows = build_datasets(cfg.data)
    model = build_gpt_model(cfg.model, groups, tokenizer.vocab_size, seed=tc.seed)
    optimizer = build_optimizer(model, tc)
    start_step, cursor = 0, DataCursor(len(train_rows), cfg.data.seed)

    resume_from = latest_checkpoint(ckpt_root) if tc.resume else None
    if resume_from is not None:
        load_model_weights(resume_from, model)
        state = load_rank_state(resume_from, groups)
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        start_step = read_meta(resume_from)["step"]
        cursor = DataCursor(len(train_rows), cfg.data.seed, **state["data"])
    elif tc.init_checkpoint:
        load_model_weights(tc.init_checkpoint, model)

    main = groups.is_main
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
        print(
            f"SFT {cfg.name}: {num_parameters(model):,} parameters on this rank, TP={groups.tp_size} "
            f"PP={groups.pp_size} DP={groups.dp_size}, {len(train_rows)} training rows, "
            f"{'resuming at step ' + str(start_step) if resume_from else 'fresh start'}",
            flush=True,
        )
    metrics = MetricsLogger(out_dir, enabled=main, resume=resume_from is not None)
    preempt = PreemptionHandler.install()
    max_new = max(len(tokenizer.encode(r.reference or "")) for r in train_rows[:512]) + 2
    eval_before = (
        exact_match(model, tokenizer, eval_rows, groups, max_new, tc.eval_samples) if start_step == 0 else {}
    )
    if eval_before:
        metrics.log("eval", 0, {f"exact_match/{d}": v for d, v in eval_before.items()})

    global_batch = tc.micro_batch_size * tc.grad_accumulation * groups.dp_size
    progress = Progress(
        tc.steps, f"sft {cfg.name}", enabled=main and tc.progress, start=start_step, log_every=tc.log_every
    )
    loss = float("nan")
    ckpt = None

    def checkpoint(step: int) -> Path:
        state = {
            "optimizer": optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "data": cursor.state(),
        }
        return save_checkpoint(
            ckpt_root,
            step,
            model,
            groups,
            config=cfg,
            tokenizer=tokenizer,
            rank_state=state,
            keep_last=tc.keep_last,
        )

    for step in range(start_step, tc.steps):
        t0 = time.monotonic()
        idx = cursor.take(global_batch)
        examples = [encode_sft_example(tokenizer, train_rows[i], cfg.model.max_sequence_length) for i in idx]
        global_tokens = sum(sum(e.loss_mask) for e in examples)
        width = max(len(e[0]) for e in examples)  # one width for all micro-batches: PP shapes must match
        mine = examples[groups.dp_rank * tc.micro_batch_size * tc.grad_accumulation :][
            : tc.micro_batch_size * tc.grad_accumulation
        ]
        microbatches = [
            pad_batch(
                collate(mine[i : i + tc.micro_batch_size], tokenizer.pad_id),
                width,
                tokenizer.pad_id,
                groups.device,
            )
            for i in range(0, len(mine), tc.micro_batch_size)
        ]
        lr = lr_at(step, tc)
        set_lr(optimizer, lr)
        loss, _ = forward_backward(
            model, microbatches, sft_forward, sft_loss, groups, global_tokens, ("tokens",)
        )
        gnorm, skipped = optimizer_step(model, optimizer, groups, loss, tc.grad_clip)
        dt = time.monotonic() - t0
        metrics.log(
            "train",
            step + 1,
            {
                "loss": loss,
                "grad_norm": gnorm,
                "lr": lr,
                "skipped": skipped,
                "tokens": global_tokens,
                "tokens_per_s": global_tokens / dt,
            },
        )
        if skipped and main:
            print(
                f"step {step + 1}: non-finite loss/grad norm ({loss}, {gnorm}); optimizer step skipped",
                flush=True,
            )
        progress.update(step + 1, f"loss {loss:.4f}")
        done = step + 1
        if tc.eval_every and done % tc.eval_every == 0 and done < tc.steps:
            em = exact_match(model, tokenizer, eval_rows, groups, max_new, tc.eval_samples)
            metrics.log("eval", done, {f"exact_match/{d}": v for d, v in em.items()})
        if tc.save_every and done % tc.save_every == 0 and done < tc.steps:
            ckpt = checkpoint(done)
        if preempt.sync(None) and done < tc.steps:
            progress.close()
            ckpt = checkpoint(done)
            metrics.log("preempted", done, {"checkpoint": str(ckpt)})
            metrics.close()
            preempt.finish(ckpt)

    progress.close()
    eval_after = exact_match(model, tokenizer, eval_rows, groups, max_new, tc.eval_samples)
    metrics.log("eval", tc.steps, {f"exact_match/{d}": v for d, v in eval_after.items()})
    ckpt = checkpoint(tc.steps)
    metrics.close()
    return SFTResult(tc.steps, loss, eval_before, eval_after, ckpt, time.monotonic() - t_start)
