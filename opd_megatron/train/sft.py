"""Supervised fine-tuning: the *specialise* stage that builds each domain expert.

Trains a Megatron GPTModel on ``prompt -> reference`` pairs (loss on completion tokens only), with AdamW,
warmup + cosine schedule, gradient clipping, gradient accumulation, data parallelism, periodic held-out
exact-match evaluation per domain, atomic checkpoints and exact resume (the cadence is
:class:`~opd_megatron.train.runner.TrainingRun`'s).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from opd_megatron.config import RunConfig
from opd_megatron.data.batching import encode_sft_example
from opd_megatron.data.domains import build_datasets
from opd_megatron.data.render import PromptRenderer
from opd_megatron.data.rows import DataError, RowErrors
from opd_megatron.distributed import ParallelGroups, init_distributed
from opd_megatron.models.checkpoint import load_model_weights, verified_checkpoint
from opd_megatron.models.gpt import build_gpt_model, num_parameters
from opd_megatron.tokenization import load_tokenizer
from opd_megatron.train.batch import DataCursor, MicroBatch, sft_microbatches
from opd_megatron.train.evaluate import exact_match
from opd_megatron.train.optim import lr_at, make_optimizer
from opd_megatron.train.runner import TrainingRun, domain_values
from opd_megatron.train.step import forward_backward


@dataclass
class SFTResult:
    step: int
    final_loss: float
    eval_before: dict[str, float]
    eval_after: dict[str, float]
    checkpoint: Path
    wall_s: float
    skipped: dict[str, int] = field(default_factory=dict)
    """Steps without an update, by reason (``nonfinite_grad``: a non-finite loss or gradient norm)."""

    @property
    def skipped_steps(self) -> int:
        return sum(self.skipped.values())


def sft_loss(output, mb: MicroBatch):
    """Cross-entropy summed over completion tokens (Megatron's vocab-parallel CE gives ``[b, s]``)."""
    mask = mb.loss_mask.float()
    return (output.float() * mask).sum(), {"tokens": mask.sum()}


def sft_forward(model, mb: MicroBatch):
    pos_BS = torch.arange(mb.tokens.shape[1], device=mb.tokens.device).expand_as(mb.tokens)
    return model(mb.tokens, pos_BS, None, labels=mb.labels)


class SFTRun(TrainingRun):
    kind = "sft"

    def __init__(self, cfg: RunConfig, groups: ParallelGroups | None = None):
        super().__init__(cfg, groups or init_distributed(cfg.parallel, cfg.train.seed))
        cfg = self.cfg  # with Hugging Face checkpoints replaced by their converted copies
        self.tokenizer = load_tokenizer(cfg.tokenizer)
        self.train_rows, self.eval_rows = build_datasets(cfg.data)
        self.render = PromptRenderer.from_config(self.tokenizer, cfg.tokenizer)
        """Row -> prompt ids under the model's chat template; completions end at its end-of-turn token."""
        self.examples = self.encode_all()
        self.max_new = max(len(self.tokenizer.encode(r.reference or "")) for r in self.train_rows[:512]) + 2
        """Tokens the evaluation generates at most: the longest training reference, its end, one spare."""
        self.check_eval_prompts()
        self.model = build_gpt_model(
            cfg.model,
            self.groups,
            self.tokenizer.vocab_size,
            seed=cfg.train.seed,
            recompute=cfg.train.recompute,
        )
        self.optimizer = make_optimizer(self.model, cfg.train, self.groups)
        self.cursor = DataCursor(len(self.train_rows), cfg.data.seed)
        self.last_loss = float("nan")
        self.skipped = {"nonfinite_grad": 0}
        """Steps whose loss or gradient norm was not finite (no optimizer step)."""

    def resume(self) -> int:
        start = super().resume()
        if start == 0 and self.tc.init_checkpoint:
            init = verified_checkpoint(self.tc.init_checkpoint, checksums=self.tc.verify_checksums)
            load_model_weights(init, self.model)
        return start

    def describe(self, start: int) -> str:
        g = self.groups
        return (
            f"SFT {self.cfg.name}: {num_parameters(self.model):,} parameters on this rank, TP={g.tp_size} "
            f"PP={g.pp_size} DP={g.dp_size}, {len(self.train_rows)} training rows, "
            f"{'resuming at step ' + str(start) if start else 'fresh start'}"
        )

    def evaluate(self) -> dict:
        em = exact_match(
            self.model, self.tokenizer, self.eval_rows, self.groups, self.max_new, self.tc.eval_samples,
            prompt_fn=self.render, end_ids=self.render.end_ids,
        )  # fmt: skip
        return {f"exact_match/{d}": v for d, v in em.items()}

    def encode_all(self) -> list:
        """Every training row as an SFT example, encoded before training starts: a row that does not
        render or does not fit the context is reported (with every other bad row) before any step."""
        end_id, max_len = self.render.end_ids[0], self.cfg.model.max_sequence_length
        errors, out = RowErrors("the training data"), []
        for row in self.train_rows:
            try:
                out.append(
                    encode_sft_example(
                        self.tokenizer, row, max_len, prompt_ids=self.render(row), end_id=end_id
                    )
                )
            except DataError as e:  # the message names the row already
                errors.lines.append(str(e))
        errors.raise_if_any()
        return out

    def check_eval_prompts(self) -> None:
        """Every held-out prompt renders and leaves room in the context for the ``max_new`` tokens the
        evaluation generates: checked before training, every bad row named (file and line)."""
        max_len = self.cfg.model.max_sequence_length
        rows = [r for rs in self.eval_rows.values() for r in rs]
        limit = (
            f"model.max_sequence_length={max_len} - {self.max_new}, the evaluation's completion length: the "
            "longest training reference + 2"
        )
        self.render.check(rows, max_prompt_tokens=max_len - self.max_new, limit=limit)

    def microbatches(self, step_rows: list[int]) -> tuple[list[MicroBatch], int]:
        """This DP rank's micro-batches of the step's rows, and the step's global completion tokens."""
        tc, g, tok = self.tc, self.groups, self.tokenizer
        examples = [self.examples[i] for i in step_rows]
        global_tokens = sum(sum(e.loss_mask) for e in examples)
        width = max(len(e[0]) for e in examples)  # one width for all micro-batches: PP shapes must match
        per_rank = tc.micro_batch_size * tc.grad_accumulation
        mine = examples[g.dp_rank * per_rank :][:per_rank]
        return sft_microbatches(mine, tc.micro_batch_size, width, tok.pad_id, g.device), global_tokens

    def train_step(self, step: int) -> dict:
        t0 = time.monotonic()
        tc, g = self.tc, self.groups
        idx = self.cursor.take(tc.micro_batch_size * tc.grad_accumulation * g.dp_size)
        mbs, global_tokens = self.microbatches(idx)
        lr = lr_at(step, tc)
        self.optimizer.set_lr(lr)
        loss, _ = forward_backward(self.model, mbs, sft_forward, sft_loss, g, global_tokens, ("tokens",))
        gnorm, skipped = self.optimizer.step(loss, tc.grad_clip)
        if skipped:
            self.skipped["nonfinite_grad"] += 1
            if g.is_main:
                print(
                    f"step {step + 1}: non-finite loss/grad norm ({loss}, {gnorm}); optimizer step skipped",
                    flush=True,
                )
        self.last_loss = loss
        dt = time.monotonic() - t0
        return {
            "loss": loss,
            "grad_norm": gnorm,
            "lr": lr,
            "skipped": skipped,
            "tokens": global_tokens,
            "tokens_per_s": global_tokens / dt,
        }


def run_sft(cfg: RunConfig, groups: ParallelGroups | None = None) -> SFTResult:
    job = SFTRun(cfg, groups)
    s = job.run()
    em = lambda rec: domain_values(rec, "exact_match")  # noqa: E731
    return SFTResult(
        s.steps, job.last_loss, em(s.first_eval), em(s.last_eval), s.checkpoint, s.wall_s, dict(job.skipped)
    )
