"""TP=2 and PP=2 compute what TP=1/PP=1 computes from the same checkpoint (gloo, 2 processes).

Process start-up (importing Megatron-core) dominates on CPU, so each layout runs once in a module-scoped
fixture that records everything the tests compare.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.multirank import run_ranks

VOCAB = 40  # padded to 48: padding rows exist and must never matter


def _cfg(tp: int = 1, pp: int = 1, tie: bool = True):
    from opd_megatron.config import ModelConfig, ParallelConfig

    model = ModelConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        max_sequence_length=32,
        tie_embeddings=tie,
    )
    return model, ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)


def _inputs():
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (3, 12), generator=g)
    return tokens, torch.arange(12).expand(3, 12)


def _full_logits(model, groups):
    """Logits ``[b, s, VOCAB]`` gathered over TP on the last stage and broadcast to every stage."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from opd_megatron.distributed.pipeline import broadcast_from_last_stage, pipeline_forward

    tokens, pos = _inputs()
    with torch.no_grad():
        out = pipeline_forward(model.eval(), tokens, pos, groups)
        full = gather_from_tensor_model_parallel_region(out) if groups.is_last_stage else None
    shape = (tokens.shape[0], tokens.shape[1], model.padded_vocab_size)
    return broadcast_from_last_stage(full, shape, torch.float32, groups)[..., :VOCAB].clone()


def _build(groups, tp, pp, tie, seed):
    from opd_megatron.models.gpt import build_gpt_model

    return build_gpt_model(_cfg(tp, pp, tie)[0], groups, VOCAB, seed=seed)


def _loaded(groups, ckpt, tp, pp, tie):
    from opd_megatron.models.checkpoint import load_model_weights

    model = _build(groups, tp, pp, tie, seed=123)  # a different init: weights must come from disk
    load_model_weights(ckpt, model)
    return model


def _train_step(model, groups):
    """One SFT optimizer step over two micro-batches: (loss, grad norm, loss after the step)."""
    from opd_megatron.config import TrainConfig
    from opd_megatron.train.batch import MicroBatch
    from opd_megatron.train.optim import build_optimizer
    from opd_megatron.train.sft import sft_forward, sft_loss
    from opd_megatron.train.step import forward_backward, optimizer_step

    model.train()
    optimizer = build_optimizer(model, TrainConfig(lr=1e-2, warmup_steps=0))
    tokens, _ = _inputs()
    mask = torch.ones_like(tokens, dtype=torch.float32)
    mask[:, :4] = 0  # prompt positions carry no loss
    labels = torch.roll(tokens, -1, dims=1)
    mbs = [MicroBatch(tokens[i : i + 2], labels[i : i + 2], mask[i : i + 2]) for i in (0, 1)]
    total = int(sum(mb.loss_mask.sum() for mb in mbs))
    loss, metrics = forward_backward(model, mbs, sft_forward, sft_loss, groups, total, ("tokens",))
    norm, skipped = optimizer_step(model, optimizer, groups, loss, max_norm=1.0)
    assert not skipped and metrics["tokens"] == total
    loss2, _ = forward_backward(
        model, mbs, sft_forward, sft_loss, groups, total, ("tokens",), forward_only=True
    )
    return loss, norm, loss2


def _reference(rank, root):
    """TP=1 PP=1: save tied and untied checkpoints, their logits, and one training step."""
    from opd_megatron.distributed import init_distributed
    from opd_megatron.models.checkpoint import save_checkpoint

    groups = init_distributed(_cfg()[1])
    out = {}
    for tie in (True, False):
        model = _build(groups, 1, 1, tie, seed=0)
        save_checkpoint(Path(root) / f"tp1_tie{tie}", 1, model, groups)
        out[f"logits_tie{tie}"] = _full_logits(model, groups)
    out["step"] = _train_step(_loaded(groups, Path(root) / "tp1_tieTrue", 1, 1, True), groups)
    return out


def _layout(rank, root, tp, pp):
    from opd_megatron.distributed import init_distributed
    from opd_megatron.models.checkpoint import save_checkpoint

    groups = init_distributed(_cfg(tp, pp)[1])
    out = {}
    for tie in (True, False):
        out[f"logits_tie{tie}"] = _full_logits(
            _loaded(groups, Path(root) / f"tp1_tie{tie}", tp, pp, tie), groups
        )
    out["step"] = _train_step(_loaded(groups, Path(root) / "tp1_tieTrue", tp, pp, True), groups)
    if tp == 2:  # a checkpoint written at TP=2, for the TP=2 -> TP=1 test
        model = _build(groups, tp, pp, True, seed=99)
        save_checkpoint(Path(root) / "tp2", 1, model, groups)
        out["tp2_logits"] = _full_logits(model, groups)
    return out


def _tp1_logits_of(rank, ckpt):
    from opd_megatron.distributed import init_distributed

    groups = init_distributed(_cfg()[1])
    return _full_logits(_loaded(groups, ckpt, 1, 1, True), groups)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("parallel")


@pytest.fixture(scope="module")
def reference(root):
    return run_ranks(_reference, 1, args=(str(root),))[0]


@pytest.fixture(scope="module")
def tp2(root, reference):
    return run_ranks(_layout, 2, args=(str(root), 2, 1))


@pytest.fixture(scope="module")
def pp2(root, reference):
    return run_ranks(_layout, 2, args=(str(root), 1, 2))


@pytest.mark.parametrize("tie", [True, False])
def test_tp2_logits_equal_tp1_from_same_checkpoint(reference, tp2, tie):
    for rank_out in tp2:
        torch.testing.assert_close(
            rank_out[f"logits_tie{tie}"], reference[f"logits_tie{tie}"], atol=1e-5, rtol=0
        )


@pytest.mark.parametrize("tie", [True, False])
def test_pp2_logits_equal_pp1_from_same_checkpoint(reference, pp2, tie):
    torch.testing.assert_close(pp2[0][f"logits_tie{tie}"], reference[f"logits_tie{tie}"], atol=1e-5, rtol=0)


def test_tp2_save_loads_at_tp1_with_identical_logits(root, tp2):
    loaded = run_ranks(_tp1_logits_of, 1, args=(str(root / "tp2"),))[0]
    torch.testing.assert_close(loaded, tp2[0]["tp2_logits"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_training_step_matches_single_process(reference, layout, request):
    loss_ref, norm_ref, after_ref = reference["step"]
    assert after_ref < loss_ref  # the reference step really changed the model
    for loss, norm, after in (r["step"] for r in request.getfixturevalue(layout)):
        assert loss == pytest.approx(loss_ref, abs=1e-5)
        assert norm == pytest.approx(norm_ref, rel=1e-4)
        assert after == pytest.approx(after_ref, abs=1e-5)  # the same update was applied
