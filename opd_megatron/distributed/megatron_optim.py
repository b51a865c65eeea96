"""Megatron-core's DistributedDataParallel and optimizer behind the training loop's optimizer interface.

What it adds over the plain torch path (:mod:`opd_megatron.train.optim`):

- gradients accumulate in one contiguous fp32 buffer (``param.main_grad``) in DP buckets, reduced
  after the last micro-batch or, with ``overlap_grad_reduce``, bucket by bucket during backward;
- a bf16/fp16 model keeps fp32 main parameters in the optimizer: an update below the bf16 resolution
  of a weight still accumulates, ``w_bf16 = round_bf16(w_fp32)`` after each step;
- fp16 scales the loss dynamically (``loss * s``; grads unscaled by ``1/s``; ``s`` halves on overflow);
- ``use_distributed_optimizer`` shards the main parameters and Adam moments over DP ranks
  (reduce-scatter of gradients, all-gather of updated parameters), so optimizer memory per rank is
  ``~12 bytes * params / dp`` instead of ``12 bytes * params``;
- the optimizer state is a sharded state dict for ``dist_checkpointing`` (``fully_reshardable``), so
  a run resumes at another TP/PP/DP layout.

The loss is already normalised by the step's global token count (see ``train.step``), so DP
gradients are summed: Megatron's DDP does that when ``calculate_per_token_loss`` is set in the model's
config, which ``models.gpt`` sets. The tied embedding of the first and last pipeline stage is
all-reduced by Megatron's ``finalize_model_grads`` on the embedding group of the passed collection.
"""

from __future__ import annotations

import math
import types

import torch

from opd_megatron.distributed.grads import all_finite
from opd_megatron.distributed.setup import ParallelGroups

SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}
"""Optimizer checkpoint format: the distributed optimizer's layout-independent variant."""


class MegatronOptim:
    """DDP-wrapped ``model`` and a Megatron optimizer; ``step`` mirrors the torch path's contract."""

    sharded = True
    """Its state goes to the distributed checkpoint (reshardable), not to the per-rank state file."""

    def __init__(self, model, cfg, groups: ParallelGroups):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        tconfig = model.config
        # A bf16/fp16 model always takes the distributed optimizer (at DP=1 it shards nothing): Megatron's
        # non-distributed mixed-precision optimizer cannot describe its checkpoint when some parameters
        # stay fp32 (the local spec's norm weights): it maps state ids over the 16-bit parameters only.
        distributed = cfg.use_distributed_optimizer or tconfig.bf16 or tconfig.fp16
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=cfg.overlap_grad_reduce,
            use_distributed_optimizer=distributed,
        )
        self.model, self.groups = model, groups
        self.ddp = DistributedDataParallel(tconfig, ddp_config, model, pg_collection=groups.pg_collection)
        # The pipeline schedules defer the bucketed reduction to the last micro-batch through this hook.
        tconfig.no_sync_func = self.ddp.no_sync
        opt_config = OptimizerConfig(
            optimizer="adam",
            lr=cfg.lr,
            min_lr=cfg.min_lr,
            weight_decay=cfg.weight_decay,
            adam_beta1=cfg.adam_beta1,
            adam_beta2=cfg.adam_beta2,
            adam_eps=1e-8,
            bf16=tconfig.bf16,
            fp16=tconfig.fp16,
            params_dtype=tconfig.params_dtype,
            initial_loss_scale=2.0**16 if tconfig.fp16 else None,
            use_distributed_optimizer=distributed,
            clip_grad=cfg.grad_clip,
        )
        # Our groups may be gloo groups already; Megatron's extra gloo groups are for NCCL setups.
        self.opt = get_megatron_optimizer(
            opt_config, [self.ddp], pg_collection=groups.pg_collection, use_gloo_process_groups=False
        )
        # Megatron's groups carry ``wd_mult`` (0 for biases and 1-D parameters such as norms, as on the
        # torch path); its scheduler applies it, and this loop has its own schedule, so apply it here.
        for group in self.opt.param_groups:
            group["weight_decay"] = cfg.weight_decay * group.get("wd_mult", 1.0)
        if tconfig.fp16:  # the schedules multiply each micro-batch's loss by this before backward
            tconfig.grad_scale_func = self.opt.scale_loss
        self.zero_grad()

    @property
    def param_groups(self) -> list[dict]:
        return self.opt.param_groups

    def set_lr(self, lr: float) -> None:
        for group in self.opt.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)

    def zero_grad(self) -> None:
        self.ddp.zero_grad_buffer()
        self.opt.zero_grad()

    def finish_grads(self) -> None:
        """Wait for (or run) the DP reduction and tie the first/last stage's embedding gradients."""
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads

        finalize_model_grads([self.ddp], num_tokens=None, pg_collection=self.groups.pg_collection)

    def step(self, loss: float, max_norm: float) -> tuple[float, bool]:
        """Reduce, check, clip, update. Returns (grad norm, skipped); a non-finite loss or norm (or an
        fp16 overflow) on any rank skips the update on every rank."""
        from megatron.core.optimizer import clip_grads

        self.finish_grads()
        found_inf = self.opt.prepare_grads()  # main grads in fp32, unscaled; agreed across ranks
        norm = float(self.opt.get_grad_norm()) if not found_inf else math.nan
        if found_inf or not all_finite(loss, self.groups) or not all_finite(norm, self.groups):
            self.zero_grad()
            return norm, True
        if max_norm > 0:
            for inner in getattr(self.opt, "chained_optimizers", [self.opt]):
                params = inner.get_parameters()
                if params:
                    clip_grads.clip_grad_by_total_norm_fp32(params, max_norm=max_norm, total_norm=norm)
        self.opt.step_with_ready_grads()
        self.zero_grad()
        return norm, False

    # ------------------------------------------------------------------ checkpoints
    def sharded_state_dict(self, is_loading: bool = False) -> dict:
        model_sd = self.model.sharded_state_dict()
        return self.opt.sharded_state_dict(model_sd, is_loading=is_loading, metadata=SHARDING)

    def load_sharded(self, directory: str) -> None:
        from megatron.core import dist_checkpointing

        self._materialise_state()
        for inner in getattr(self.opt, "chained_optimizers", [self.opt]):
            if hasattr(inner, "_set_main_param_and_optimizer_states"):
                inner._set_main_param_and_optimizer_states = types.MethodType(_set_states, inner)
        state = dist_checkpointing.load(self.sharded_state_dict(is_loading=True), directory)
        self.opt.load_state_dict(state)
        # Without apex/TE the distributed optimizer restores torch Adam's per-parameter ``step`` as one
        # tensor shared by every parameter; Adam increments it in place per parameter, so the bias
        # correction of the next step would count every parameter as a step. Give each its own copy.
        for inner in getattr(self.opt, "chained_optimizers", [self.opt]):
            for st in getattr(inner, "optimizer", inner).state.values():
                if isinstance(st.get("step"), torch.Tensor):
                    st["step"] = st["step"].clone()

    def _materialise_state(self) -> None:
        """The distributed optimizer describes its checkpoint from its own state, which Adam creates at
        its first step: take one step with zero gradients at lr 0 and no weight decay (parameters
        unchanged), whose moments the load then overwrites."""
        for inner in getattr(self.opt, "chained_optimizers", [self.opt]):
            if not hasattr(inner, "_init_optimizer_states_with_dummy_values") or inner.optimizer.state:
                continue
            saved = [(g["lr"], g["weight_decay"]) for g in inner.optimizer.param_groups]
            for g in inner.optimizer.param_groups:
                g["lr"], g["weight_decay"] = 0.0, 0.0
            inner._init_optimizer_states_with_dummy_values()
            for g, (lr, wd) in zip(inner.optimizer.param_groups, saved):
                g["lr"], g["weight_decay"] = lr, wd


def _set_states(dopt, model_param, tensors: dict) -> None:
    """``DistributedOptimizer._set_main_param_and_optimizer_states`` for torch's Adam (no apex/TE): the
    original copies every key of the destination state, which for torch's Adam includes the per-parameter
    ``step`` that the reshardable format stores once per optimizer (and restores itself), so it fails on
    the missing key. Copy the keys the checkpoint holds: the fp32 main parameter and the two moments."""
    group_index, group_order = dopt.model_param_group_index_map[model_param]
    main_param = dopt.optimizer.param_groups[group_index]["params"][group_order]
    dst = {"param": main_param, **dopt.optimizer.state[main_param]}
    for key, src in tensors.items():
        dst[key].copy_(src)
