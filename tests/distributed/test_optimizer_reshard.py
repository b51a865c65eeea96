"""The Megatron optimizer's state is saved through ``dist_checkpointing`` and reshards: a run saved at
DP=2 (distributed optimizer) continues at DP=1 and at TP=2 exactly as the uninterrupted run does (fp32).

The machine has 2 cores, so the layouts here use at most 2 ranks; each run is a few tiny steps.
"""

from __future__ import annotations

import torch

from tests.multirank import run_ranks

VOCAB, ROWS, WIDTH = 48, 4, 10


def _setup(tp: int, pp: int = 1):
    from opd_megatron.config import ModelConfig, ParallelConfig, TrainConfig
    from opd_megatron.distributed import init_distributed
    from opd_megatron.models.gpt import build_gpt_model
    from opd_megatron.train.optim import make_optimizer

    g = init_distributed(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp), 0)
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=2, max_sequence_length=16)
    model = build_gpt_model(cfg, g, VOCAB, seed=0)
    tc = TrainConfig(lr=1e-2, warmup_steps=0, optimizer_impl="megatron", use_distributed_optimizer=True)
    return g, model, make_optimizer(model, tc, g), tc


def _steps(g, model, opt, tc, n: int) -> list[float]:
    from opd_megatron.train.batch import MicroBatch
    from opd_megatron.train.sft import sft_forward, sft_loss
    from opd_megatron.train.step import forward_backward

    gen = torch.Generator().manual_seed(3)
    tokens_BS = torch.randint(0, VOCAB, (ROWS, WIDTH), generator=gen)
    labels_BS, mask_BS = torch.roll(tokens_BS, -1, dims=1), torch.ones(ROWS, WIDTH)
    per_rank = ROWS // g.dp_size
    lo = g.dp_rank * per_rank
    mb = MicroBatch(tokens_BS[lo : lo + per_rank], labels_BS[lo : lo + per_rank], mask_BS[lo : lo + per_rank])
    losses = []
    for _ in range(n):
        loss, _ = forward_backward(model, [mb], sft_forward, sft_loss, g, ROWS * WIDTH, ("tokens",))
        assert not opt.step(loss, tc.grad_clip)[1]
        losses.append(loss)
    return losses


def _save(g, model, opt, root: str, step: int) -> None:
    from opd_megatron.models.checkpoint import save_checkpoint

    save_checkpoint(root, step, model, g, extra_models={"optimizer": opt})


def _params(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "_extra_state" not in k}


def _uninterrupted(rank, root: str):
    g, model, opt, tc = _setup(tp=1)
    losses = _steps(g, model, opt, tc, 3)
    return losses, _params(model)


def _first_part(rank, root: str):
    g, model, opt, tc = _setup(tp=1)  # 2 ranks: DP=2
    _steps(g, model, opt, tc, 2)
    _save(g, model, opt, root, 2)


def _resume(rank, root: str, tp: int, out: str):
    from opd_megatron.models.checkpoint import load_model_weights

    g, model, opt, tc = _setup(tp=tp)
    load_model_weights(f"{root}/step_0000002", model)
    opt.load_sharded(f"{root}/step_0000002/optimizer")
    losses = _steps(g, model, opt, tc, 1)
    _save(g, model, opt, out, 3)  # read back at TP=1 to compare whole tensors
    return losses


def _read_back(rank, ckpt: str):
    from opd_megatron.models.checkpoint import load_model_weights

    g, model, _, _ = _setup(tp=1)
    load_model_weights(ckpt, model)
    return _params(model)


def test_optimizer_state_reshards_dp2_to_dp1_and_tp2(tmp_path):
    ref_losses, ref_params = run_ranks(_uninterrupted, 1, 240, (str(tmp_path),))[0]
    run_ranks(_first_part, 2, 300, (str(tmp_path / "a"),))
    for world, tp in ((1, 1), (2, 2)):
        out = tmp_path / f"resumed_tp{tp}"
        losses = run_ranks(_resume, world, 300, (str(tmp_path / "a"), tp, str(out)))[0]
        assert abs(losses[0] - ref_losses[2]) <= 1e-6, (tp, losses, ref_losses)
        params = run_ranks(_read_back, 1, 240, (str(out / "step_0000003"),))[0]
        for k, v in ref_params.items():
            torch.testing.assert_close(params[k], v, atol=1e-6, rtol=0, msg=f"TP={tp}: {k}")
