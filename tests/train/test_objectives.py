"""The objective objects of the OPD loop on crafted micro-batches, against hand-computed values (float64,
one process): each target kind's loss and metrics, the sampled-token objectives' grids and label
gather, RLSD's signs, and the take_rows of targets that confidence routing reuses."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from opd_megatron.config import LossConfig
from opd_megatron.data.jsonl import PromptRow
from opd_megatron.losses.objectives import rlsd_loss
from opd_megatron.targets import CrossTokenizerTargets, MixtureTargets, TeacherTargets, TopKTargets
from opd_megatron.train.batch import MicroBatch, completion_grid
from opd_megatron.train.objectives import (
    CrossTokenizerObjective,
    DenseObjective,
    MixtureObjective,
    Objectives,
    SampledTokenObjective,
    TopKObjective,
)

H, V = 6, 7
PROMPTS = [[1, 2, 3], [1, 4]]
COMPS = [[5, 6], [2, 3, 0]]  # 5 completion tokens; row 1 is longer
N = 5


def _crafted(seed: int = 0, weights=None):
    """A two-row micro-batch ``[2, 5]`` with its loss positions, and student/teacher tensors (float64)."""
    g = torch.Generator().manual_seed(seed)
    width = max(len(p) + len(c) for p, c in zip(PROMPTS, COMPS))
    tokens = torch.zeros(2, width, dtype=torch.long)
    for i, (p, c) in enumerate(zip(PROMPTS, COMPS)):
        tokens[i, : len(p) + len(c)] = torch.tensor(p + c)
    labels = torch.roll(tokens, -1, dims=1)
    labels[:, -1] = 0
    ones = [[1.0] * len(c) for c in COMPS]
    mb = MicroBatch(
        tokens=tokens,
        labels=labels,
        loss_mask=completion_grid(PROMPTS, COMPS, ones, width),
        behaviour=completion_grid(PROMPTS, COMPS, [[-1.0, -2.0], [-0.5, -1.5, -2.5]], width),
        weights=completion_grid(PROMPTS, COMPS, weights or ones, width),
        rows=[
            PromptRow(prompt="ab", domain="reversal", reference="ba"),
            PromptRow(prompt="xy", domain="reversal", reference="yx"),
        ],
        prompts=PROMPTS,
        comps=COMPS,
    )
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    teacher = TeacherTargets(
        torch.randn(N, H, generator=g, dtype=torch.float64),
        torch.randn(V, H, generator=g, dtype=torch.float64),
    )
    return mb, hidden, weight, teacher


def _reverse_kl(s_logits, t_logp):
    s_logp = torch.log_softmax(s_logits, -1)
    return (s_logp.exp() * (s_logp - t_logp)).sum(-1)


def test_completion_grid_places_values_at_the_predicting_positions():
    mb, *_ = _crafted()
    # row 0: prompt of 3 -> completion token j is predicted at position 2 + j
    assert mb.loss_mask[0].tolist() == [0, 0, 1, 1, 0]
    assert mb.loss_mask[1].tolist() == [0, 1, 1, 1, 0]
    assert mb.labels[mb.loss_positions].tolist() == [t for c in COMPS for t in c]
    assert mb.behaviour[mb.loss_positions].tolist() == [-1.0, -2.0, -0.5, -1.5, -2.5]


def test_dense_objective_is_the_weighted_reverse_kl_summed_over_tokens():
    w = [[1.0, 2.0], [0.5, 0.0, 3.0]]
    mb, hidden, weight, teacher = _crafted(1, weights=w)
    mb.target = teacher
    loss, m = DenseObjective(LossConfig(), None, V).loss(hidden, weight, mb)
    s_logits = hidden @ weight.t()
    kl = _reverse_kl(s_logits, torch.log_softmax(teacher.logits_NV().double(), -1))
    w_N = torch.tensor([x for r in w for x in r], dtype=torch.float64)
    assert_close(loss.double(), (kl * w_N).sum(), atol=1e-6, rtol=1e-6)
    assert float(m["tokens"]) == N
    # the logged KL counts every token of non-zero weight, unweighted
    assert_close(float(m["kl_sum"]), float(kl[w_N > 0].sum()), atol=1e-6, rtol=1e-6)
    agree = (s_logits.argmax(-1) == teacher.logits_NV().argmax(-1))[w_N > 0].sum()
    assert float(m["agree_sum"]) == float(agree)


def test_opsd_objective_clips_each_tokens_divergence():
    mb, hidden, weight, teacher = _crafted(2)
    mb.target = teacher
    kl = _reverse_kl(hidden @ weight.t(), torch.log_softmax(teacher.logits_NV().double(), -1))
    tau = float(kl.median())
    lc = LossConfig(objective="opsd", opsd_tau=tau)
    loss, _ = DenseObjective(lc, None, V).loss(hidden, weight, mb)
    assert_close(loss.double(), kl.clamp(max=tau).sum(), atol=1e-6, rtol=1e-6)


def test_mixture_objective_uses_the_weighted_mixture_of_the_teachers():
    mb, hidden, weight, t1 = _crafted(3)
    _, _, _, t2 = _crafted(4)
    w_MN = torch.tensor([[0.25] * N, [0.75] * N], dtype=torch.float64)
    mb.target = MixtureTargets([t1, t2], w_MN)
    loss, _ = MixtureObjective(LossConfig(), None, V).loss(hidden, weight, mb)
    p_mix = 0.25 * torch.softmax(t1.logits_NV().double(), -1) + 0.75 * torch.softmax(
        t2.logits_NV().double(), -1
    )
    assert_close(loss.double(), _reverse_kl(hidden @ weight.t(), p_mix.log()).sum(), atol=1e-6, rtol=1e-6)


def test_topk_objective_with_every_token_equals_the_dense_one():
    mb, hidden, weight, teacher = _crafted(5)
    lp = torch.log_softmax(teacher.logits_NV().double(), -1)
    top = lp.topk(V, dim=-1)
    labels_N = mb.labels[mb.loss_positions]
    mb.target = TopKTargets(top.indices, top.values, lp.gather(1, labels_N[:, None]).squeeze(1))
    loss, m = TopKObjective(LossConfig(), None, V).loss(hidden, weight, mb)
    assert_close(loss.double(), _reverse_kl(hidden @ weight.t(), lp).sum(), atol=1e-6, rtol=1e-6)
    assert float(m["tokens"]) == N


def test_cross_objective_reads_vocabulary_and_shared_ids_from_its_target():
    mb, hidden, weight, teacher = _crafted(6)
    ids = torch.arange(V)
    lc = LossConfig(divergence="forward_kl", cross_kl="shared", uld_weight=0.0)
    mb.target = CrossTokenizerTargets(
        inner=teacher,
        aligned_N=torch.ones(N, dtype=torch.bool),
        teacher_index_N=torch.arange(N),
        teacher_completion_ids=COMPS,
        alignments=[],
        teacher_vocab=V,
        shared_ids=(ids, ids),
    )
    loss, _ = CrossTokenizerObjective(lc, None, V).loss(hidden, weight, mb)
    t_lp = torch.log_softmax(teacher.logits_NV().double(), -1)
    s_lp = torch.log_softmax(hidden @ weight.t(), -1)
    forward = (t_lp.exp() * (t_lp - s_lp)).sum(-1).sum()
    assert_close(loss.double(), forward, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("objective", ["tinker", "rlsd"])
def test_sampled_objective_gathers_label_logprobs_onto_the_grid(objective):
    mb, hidden, weight, teacher = _crafted(7)
    mb.target = teacher
    lc = LossConfig(objective=objective)
    decode = lambda ids: "ba" if ids == COMPS[0] else "nope"  # noqa: E731  row 0 verifies, row 1 does not
    obj = SampledTokenObjective(lc, None, V, decode)
    loss, m = obj.loss(hidden, weight, mb)
    labels_N = mb.labels[mb.loss_positions]
    s_lp_N = torch.log_softmax(hidden @ weight.t(), -1).gather(1, labels_N[:, None]).squeeze(1)
    t_lp_N = torch.log_softmax(teacher.logits_NV().double(), -1).gather(1, labels_N[:, None]).squeeze(1)
    assert_close(float(m["kl_sum"]), float((s_lp_N - t_lp_N).sum()), atol=1e-6, rtol=1e-6)
    if objective == "tinker":
        # on-policy REINFORCE with a_t = log p_T - log q_S, behaviour log-probs importance-sampled
        behaviour_N = mb.behaviour[mb.loss_positions].double()
        ratio_N = torch.exp(s_lp_N - behaviour_N)
        assert_close(loss.double(), -(ratio_N * (t_lp_N - s_lp_N)).sum(), atol=1e-6, rtol=1e-6)
    else:
        signs = obj.signs(mb)
        assert signs.tolist() == [1.0, -1.0]
        grid = lambda v: torch.zeros(mb.loss_mask.shape, dtype=v.dtype).masked_scatter(mb.loss_positions, v)  # noqa: E731
        ref = rlsd_loss(
            grid(s_lp_N), grid(t_lp_N), signs, mb.loss_mask, reduction="token_mean", normaliser=1.0
        )
        assert_close(loss.double(), ref.loss.double(), atol=1e-6, rtol=1e-6)
        # a failed rollout pushes its tokens down: d loss / d log q_S has the sign of -A on row 1
        assert float(ref.advantages[1][mb.loss_positions[1]].max()) < 0


def test_objectives_pick_by_target_kind_and_objective():
    mb, *_ = _crafted()
    objs = Objectives(LossConfig(), None, V)
    assert isinstance(objs.for_target(TeacherTargets(torch.zeros(1, H), torch.zeros(V, H))), DenseObjective)
    assert isinstance(objs.for_target(MixtureTargets([], torch.zeros(0, 0))), MixtureObjective)
    sampled = Objectives(LossConfig(objective="gopd"), None, V)
    assert isinstance(
        sampled.for_target(TeacherTargets(torch.zeros(1, H), torch.zeros(V, H))), SampledTokenObjective
    )


def test_take_rows_keeps_each_rollouts_tokens_and_renumbers_teacher_rows():
    lengths = [2, 3, 1]
    dense = TeacherTargets(torch.arange(6.0)[:, None], torch.zeros(1, 1))
    assert dense.take_rows(lengths, [2, 0]).hidden_NH.squeeze(1).tolist() == [5.0, 0.0, 1.0]
    # teacher tokenisation: 1, 2 and 2 tokens per row; student token -> teacher row (row-major)
    inner = TopKTargets(torch.arange(5)[:, None], torch.zeros(5, 1), torch.arange(5.0))
    al = ["a0", "a1", "a2"]  # stand-ins: take_rows only reorders them
    cross = CrossTokenizerTargets(
        inner=inner,
        aligned_N=torch.tensor([True, False, True, True, False, True]),
        teacher_index_N=torch.tensor([0, 0, 1, -1, 2, 4]),
        teacher_completion_ids=[[10], [11, 12], [13, 14]],
        alignments=al,
        prefix_N=[b"", b"x", b"", b"", b"y", b""],
    )
    sub = cross.take_rows(lengths, [1, 2])
    assert sub.teacher_completion_ids == [[11, 12], [13, 14]]
    assert sub.inner.token_logprobs_N.tolist() == [1.0, 2.0, 3.0, 4.0]
    # row 1's teacher rows 1, 2 become 0, 1; row 2's row 4 becomes 3; -1 stays
    assert sub.teacher_index_N.tolist() == [0, -1, 1, 3]
    assert sub.aligned_N.tolist() == [True, True, False, True]
    assert sub.prefix_N == [b"", b"", b"y", b""] and sub.alignments == ["a1", "a2"]
