"""The Megatron optimizer's state is saved through ``dist_checkpointing`` and reshards: a run saved at
DP=2 x TP=2 (distributed optimizer, 4 ranks) continues at DP=1 x TP=1, at TP=2 and at TP=2 x PP=2
exactly as the uninterrupted run does (fp32, 1e-6).

4 ranks on a 2-core machine: the model and the runs are tiny (a few steps each).
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


def _run(rank, root: str, steps: int):
    """DP=2 x TP=2 (4 ranks): ``steps`` steps, then a save."""
    g, model, opt, tc = _setup(tp=2)
    assert (g.dp_size, g.tp_size) == (2, 2)
    losses = _steps(g, model, opt, tc, steps)
    _save(g, model, opt, root, steps)
    return losses


def _resume(rank, root: str, tp: int, pp: int, out: str):
    from opd_megatron.models.checkpoint import load_model_weights

    g, model, opt, tc = _setup(tp=tp, pp=pp)
    assert (g.dp_size, g.tp_size, g.pp_size) == (1, tp, pp)
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


def test_optimizer_state_saved_at_dp2_tp2_resumes_at_dp1_tp2_and_tp2_pp2(tmp_path):
    # The uninterrupted run is at the saving layout: another layout's first steps would round
    # differently, and Adam's first updates (about lr * sign(g)) make that visible.
    ref_losses = run_ranks(_run, 4, 400, (str(tmp_path / "straight"), 3))[0]
    ref_params = run_ranks(_read_back, 1, 240, (str(tmp_path / "straight" / "step_0000003"),))[0]
    run_ranks(_run, 4, 400, (str(tmp_path / "a"), 2))
    for tp, pp in ((1, 1), (2, 1), (2, 2)):
        out = tmp_path / f"resumed_tp{tp}_pp{pp}"
        losses = run_ranks(_resume, tp * pp, 400, (str(tmp_path / "a"), tp, pp, str(out)))[0]
        assert abs(losses[0] - ref_losses[2]) <= 1e-6, (tp, pp, losses, ref_losses)
        params = run_ranks(_read_back, 1, 240, (str(out / "step_0000003"),))[0]
        for k, v in ref_params.items():
            diff = float((params[k] - v).abs().max())
            assert diff <= 1e-6, f"TP={tp} PP={pp}: {k} differs by {diff:.3g} from the uninterrupted run"
