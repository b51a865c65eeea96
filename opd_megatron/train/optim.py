"""Optimizer and learning-rate schedule shared by SFT and OPD.

Two implementations behind one small interface (``set_lr``, ``zero_grad``, ``step(loss, max_norm) ->
(grad norm, skipped)``, ``param_groups``, ``sharded``), picked by ``train.optimizer_impl``:

- ``torch`` (:class:`TorchOptim`): AdamW on the model's parameters, gradients synchronised by
  :mod:`opd_megatron.distributed.grads`; its state is per rank (``state_dict``), saved in the rank
  state, so a resume needs the same layout;
- ``megatron`` (:class:`~opd_megatron.distributed.megatron_optim.MegatronOptim`): Megatron-core's DDP
  and optimizer, fp32 main parameters for bf16/fp16, optional distributed optimizer; its state is a
  sharded state dict saved with the weights (``sharded = True``), loadable at any layout.
"""

from __future__ import annotations

import math

import torch

from opd_megatron.config import TrainConfig
from opd_megatron.distributed import ParallelGroups


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; biases and norm weights (1-D parameters) take no weight decay."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=1e-8,
    )


class TorchOptim:
    """AdamW with the loop's gradient sync, norm, clipping and non-finite skip."""

    sharded = False

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, groups: ParallelGroups):
        self.model, self.groups = model, groups
        self.opt = build_optimizer(model, cfg)

    @property
    def param_groups(self) -> list[dict]:
        return self.opt.param_groups

    def set_lr(self, lr: float) -> None:
        set_lr(self.opt, lr)

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def step(self, loss: float, max_norm: float) -> tuple[float, bool]:
        from opd_megatron.train.step import optimizer_step

        return optimizer_step(self.model, self.opt, self.groups, loss, max_norm)

    def state_dict(self) -> dict:
        return self.opt.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, groups: ParallelGroups):
    """The optimizer of ``train.optimizer_impl`` for ``model`` (built, not yet wrapped)."""
    if cfg.optimizer_impl == "megatron":
        from opd_megatron.distributed.megatron_optim import MegatronOptim

        return MegatronOptim(model, cfg, groups)
    return TorchOptim(model, cfg, groups)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup from lr/warmup to lr, then the
    schedule from lr down to min_lr at the last step."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(1, cfg.steps - cfg.warmup_steps - 1)
    frac = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.lr_schedule == "linear":
        return cfg.lr + (cfg.min_lr - cfg.lr) * frac
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * frac))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
