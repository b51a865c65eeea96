"""Qwen3, Llama-3 and YaRN RoPE scaling and Qwen3-MoE: converted from tiny random ``transformers`` models
built here, logits equal to transformers' at TP=1, TP=2 and (MoE) EP=2, exported back with identical tensors;
HF directories materialised once into a content-keyed cache; a live model exported from TP=2 / EP=2
loads in transformers with the same logits and greedy output. All multi-rank work runs once in a
module-scoped fixture (process start-up dominates on CPU) and the tests check what it recorded.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from opd_megatron.config import ConfigError, ModelConfig
from opd_megatron.models.hf_convert import ConversionError, model_config_from_hf
from opd_megatron.models.hf_dir import (
    content_hash,
    is_hf_dir,
    materialise,
    merge_model_config,
)
from opd_megatron.models.hf_dir import model_config_from_hf as config_from_dir
from opd_megatron.models.hf_safetensors import HFWeights
from tests.multirank import run_ranks

TOKENS = 100  # the tokenizer's size
ROWS = 120  # embedding rows of the Qwen models: more than the tokenizer has tokens
SEQ = 10
FAMILIES = ("qwen3", "llama3", "yarn", "moe", "moe_raw")
YARN_ORIGINAL = 4  # YaRN's pre-training context: SEQ reaches beyond it
WIDE = 136  # embedding rows of a second Qwen3 with the same tokenizer (the teacher of the pairing test)


def _write_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {**{t: i for i, t in enumerate(specials)}, **{f"w{i}": i for i in range(3, TOKENS)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = Whitespace()
    tok.add_special_tokens(specials)
    tok.save(str(directory / "tokenizer.json"))
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    )
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "chat_template": template})
    )


def _hf_model(family: str):
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    kw = dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=ROWS, max_position_embeddings=64, rms_norm_eps=1e-5,
    )  # fmt: skip
    if family == "qwen3":  # head_dim 12 != 32 / 4, tied
        return Qwen3ForCausalLM(Qwen3Config(**kw, head_dim=12, tie_word_embeddings=True))
    if family == "llama3":
        rope = dict(rope_type="llama3", rope_theta=50000.0, factor=8.0, low_freq_factor=1.0,
                    high_freq_factor=2.0, original_max_position_embeddings=16)  # fmt: skip
        return LlamaForCausalLM(LlamaConfig(**{**kw, "vocab_size": TOKENS}, rope_parameters=rope))
    if family == "yarn":  # a Qwen3 with YaRN; mscale / mscale_all_dim give an attention factor of 1.0726
        rope = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, beta_fast=8.0, beta_slow=0.5,
                    mscale=0.9, mscale_all_dim=0.4, original_max_position_embeddings=YARN_ORIGINAL)  # fmt: skip
        return Qwen3ForCausalLM(Qwen3Config(**kw, head_dim=16, rope_parameters=rope))
    moe = dict(head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24)
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(**kw, **moe, norm_topk_prob=family == "moe"))


def _make(directory: Path, family: str, seed: int, rows: int | None = None):
    torch.manual_seed(seed)
    model = _hf_model(family)
    if rows is not None:
        model.resize_token_embeddings(rows)
    with torch.no_grad():  # norms random too, so a mix-up of q_norm and k_norm cannot hide
        for _, p in model.named_parameters():
            p.copy_(1.0 + 0.3 * torch.randn_like(p)) if p.dim() == 1 else p.normal_(0.0, 0.15)
    model.eval().save_pretrained(directory)
    _write_tokenizer(directory)
    return model


def _inputs():
    return torch.randint(0, TOKENS, (2, SEQ), generator=torch.Generator().manual_seed(5))


# ----------------------------------------------------------------------------------------------------
# Multi-rank worker
# ----------------------------------------------------------------------------------------------------


def _logits(model, groups, ids) -> torch.Tensor:
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    with torch.no_grad():
        out = model.eval()(ids, torch.arange(ids.shape[1]).expand_as(ids), None)
        return gather_from_tensor_model_parallel_region(out)[..., : model.real_vocab_size].clone()


def _greedy(model, groups, ids, steps=6) -> torch.Tensor:
    for _ in range(steps):
        nxt = _logits(model, groups, ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


def _load(groups, ckpt, vocab=TOKENS):
    from opd_megatron.models.checkpoint import load_model_weights, read_config
    from opd_megatron.models.gpt import build_gpt_model

    model = build_gpt_model(read_config(ckpt).model, groups, vocab, seed=77)  # weights must come from disk
    load_model_weights(ckpt, model)
    return model


def _run_all(rank, root):
    from opd_megatron.config import ParallelConfig
    from opd_megatron.distributed import init_distributed
    from opd_megatron.models.hf_convert import export_hf_checkpoint
    from opd_megatron.models.hf_export import export_hf

    root = Path(root)
    out: dict = {}

    def layout(tp=1, ep=1):
        return init_distributed(ParallelConfig(tensor_model_parallel_size=tp, expert_model_parallel_size=ep))

    groups = layout(tp=2)
    ckpt, beyond = {}, {}
    for fam in FAMILIES:
        m = materialise(
            root / fam, groups, root / "cache", where=f"teachers[{FAMILIES.index(fam)}].checkpoint"
        )
        ckpt[fam], beyond[fam] = m.checkpoint, m.beyond_tokenizer
        out[f"{fam}_converted"] = m.converted
    out["beyond"] = {k: str(v) if v else None for k, v in beyond.items()}
    out["again"] = materialise(root / "qwen3", groups, root / "cache").converted
    out["pairing"] = _pair_through_registry(
        groups, ckpt["qwen3"], materialise(root / "wide", groups, root / "cache")
    )
    out["ckpt"] = {k: str(v) for k, v in ckpt.items()}
    ids = _inputs()
    for fam in FAMILIES:
        out[f"{fam}_tp2"] = _logits(_load(groups, ckpt[fam]), groups, ids)
    # A live model at TP=2 exported: tied Qwen3 with more rows than tokens.
    live = _load(groups, ckpt["qwen3"])
    out["live_rows"] = (live.real_vocab_size, live.padded_vocab_size)
    out["qwen3_greedy"] = _greedy(live, groups, ids)
    export_hf(live, live_cfg(ckpt["qwen3"]), ckpt["qwen3"] / "hf", root / "qwen3_live", groups)
    export_hf(
        live, live_cfg(ckpt["qwen3"]), ckpt["qwen3"] / "hf", root / "qwen3_live_rows", groups,
        beyond_tokenizer=beyond["qwen3"],
    )  # fmt: skip

    groups = layout(tp=1, ep=2)
    for fam in ("moe", "moe_raw"):
        model = _load(groups, ckpt[fam])
        out[f"{fam}_ep2"] = _logits(model, groups, ids)
        out[f"{fam}_local_experts"] = len(model.decoder.layers[0].mlp.experts.local_experts)
    moe = _load(groups, ckpt["moe"])
    out["moe_greedy"] = _greedy(moe, groups, ids)
    export_hf(moe, live_cfg(ckpt["moe"]), ckpt["moe"] / "hf", root / "moe_live", groups)
    out["uneven"] = _uneven_ep_step(groups, _load(groups, ckpt["moe"]), rank)

    # PP=2: each stage writes its own shard; the tied Qwen3's last-stage copy of the embedding is not.
    groups = init_distributed(ParallelConfig(pipeline_model_parallel_size=2))
    for fam in ("qwen3", "llama3"):
        export_hf(
            _load(groups, ckpt[fam]), live_cfg(ckpt[fam]), ckpt[fam] / "hf", root / f"{fam}_pp2", groups
        )

    groups = layout(tp=1)
    for fam in FAMILIES:
        out[f"{fam}_tp1"] = _logits(_load(groups, ckpt[fam]), groups, ids)
        export_hf_checkpoint(ckpt[fam], root / f"{fam}_back", groups)
    return out


def _uneven_batch(rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(40 + rank)
    return torch.randint(0, TOKENS, (1 + rank, 6 + 3 * rank), generator=g)


def _uneven_ep_step(groups, model, rank):
    """EP ranks with batches of different shapes (as data-parallel ranks have): logits, and the gradient
    of each rank's experts, which receive tokens of both ranks' batches."""
    model.train()
    ids = _uneven_batch(rank)
    out = model(ids, torch.arange(ids.shape[1]).expand_as(ids), None)
    logits = out[..., :TOKENS]
    logits.pow(2).mean().backward()
    first = groups.ep_rank * len(model.decoder.layers[0].mlp.experts.local_experts)
    grads = {}
    for layer in model.decoder.layers:
        for i, expert in enumerate(layer.mlp.experts.local_experts):
            grads[(layer.layer_number - 1, first + i)] = expert.linear_fc2.weight.grad.clone()
    return logits.detach().clone(), grads


def _pair_through_registry(groups, student_ckpt, teacher):
    """The run's teacher registry pairs a student and a teacher whose embeddings differ in rows but whose
    tokenizer is the same; both hold the tokenizer's rows, in identical vocabulary shards."""
    from opd_megatron.config import RunConfig, TeacherConfig
    from opd_megatron.models.gpt import output_weight
    from opd_megatron.mopd.registry import build_teacher
    from opd_megatron.tokenization import load_tokenizer

    student = _load(groups, student_ckpt)
    tcfg = TeacherConfig(name="wide", checkpoint=str(teacher.checkpoint))
    cfg = RunConfig(model=live_cfg(student_ckpt), tokenizer=teacher.tokenizer, teachers=[tcfg])
    cfg.parallel.tensor_model_parallel_size = groups.tp_size
    t = build_teacher(0, tcfg, cfg, groups, load_tokenizer(cfg.tokenizer))
    return {
        "rows": (teacher.model.vocab_size, live_cfg(student_ckpt).vocab_size),
        "padded": (t.model.padded_vocab_size, student.padded_vocab_size),
        "shard": (output_weight(t.model).shape[0], output_weight(student).shape[0]),
        "teacher_logits": _logits(t.model, groups, _inputs()),
    }


def live_cfg(ckpt):
    from opd_megatron.models.checkpoint import read_config

    return read_config(ckpt).model


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    ref = {}
    for seed, fam in enumerate(FAMILIES):
        model = _make(root / fam, fam, seed)
        with torch.no_grad():
            ref[fam] = model(_inputs()).logits[..., :TOKENS]
    wide = _make(root / "wide", "qwen3", 9, rows=WIDE)
    with torch.no_grad():
        ref["wide"] = wide(_inputs()).logits[..., :TOKENS]
    results = run_ranks(_run_all, 2, timeout=600, args=(str(root),))
    return root, ref, results


# ----------------------------------------------------------------------------------------------------
# End-to-end
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family, layout",
    [(f, layout) for f in FAMILIES for layout in ("tp1", "tp2")] + [("moe", "ep2"), ("moe_raw", "ep2")],
)
def test_logits_equal_transformers(run, family, layout):
    _, ref, results = run
    assert ref[family].abs().max() > 0.5  # large enough for the tolerance to mean something
    for rank_out in results:
        torch.testing.assert_close(rank_out[f"{family}_{layout}"], ref[family], atol=1e-4, rtol=0)


def test_expert_parallel_ranks_with_different_batches(run):
    """Both ranks' losses reach every expert: its gradient is that of the sum of the two ranks' losses."""
    from transformers import AutoModelForCausalLM

    root, _, results = run
    hf = AutoModelForCausalLM.from_pretrained(root / "moe").eval()
    total = 0.0
    for rank, r in enumerate(results):
        logits = hf(_uneven_batch(rank)).logits[..., :TOKENS]
        torch.testing.assert_close(r["uneven"][0], logits.detach(), atol=1e-4, rtol=0)
        total = total + logits.pow(2).mean()
    total.backward()
    owned = {key: g for r in results for key, g in r["uneven"][1].items()}
    assert sorted(owned) == [(layer, e) for layer in range(2) for e in range(4)]
    for (layer, e), grad in owned.items():
        experts = hf.model.layers[layer].mlp.experts
        # transformers 5 stacks the experts into one [experts, hidden, expert ffn] parameter.
        fused = isinstance(experts.down_proj, torch.nn.Parameter)
        expected = experts.down_proj.grad[e] if fused else experts[e].down_proj.weight.grad
        assert expected.abs().max() > 0
        torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-4)


def test_experts_are_split_over_the_ep_group(run):
    _, _, results = run
    assert [r["moe_local_experts"] for r in results] == [2, 2]


@pytest.mark.parametrize(
    "family, rope",
    [
        ("llama3", {"rope_type": "default", "rope_theta": 50000.0}),
        ("yarn", {"rope_type": "default", "rope_theta": 10000.0}),
        # YaRN's frequencies without its attention factor
        ("yarn", {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 8.0, "beta_slow": 0.5,
                  "attention_factor": 1.0, "original_max_position_embeddings": YARN_ORIGINAL}),
    ],
)  # fmt: skip
def test_rope_scaling_changes_the_logits(run, family, rope):
    """The tests above would pass with scaling (or YaRN's attention factor) ignored only if it had no
    effect at these positions."""
    from transformers import AutoModelForCausalLM

    root, ref, _ = run
    other = AutoModelForCausalLM.from_pretrained(root / family, rope_parameters=rope)
    with torch.no_grad():
        assert (other.eval()(_inputs()).logits[..., :TOKENS] - ref[family]).abs().max() > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_gives_identical_tensors(run, family):
    root, _, _ = run
    src, back = HFWeights(root / family), HFWeights(root / f"{family}_back")
    assert sorted(src.names()) == sorted(back.names())
    for name in src.names():
        a, b = src.read(name), back.read(name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    src_cfg = json.loads((root / family / "config.json").read_text())
    back_cfg = json.loads((root / f"{family}_back" / "config.json").read_text())
    assert model_config_from_hf(back_cfg) == model_config_from_hf(src_cfg)


def test_materialise_converts_once_and_records_the_tokenizer_vocabulary(run):
    root, _, results = run
    assert all(r[f"{f}_converted"] for r in results for f in FAMILIES)
    assert [r["again"] for r in results] == [False, False]  # the cache entry was reused
    ckpt = Path(results[0]["ckpt"]["qwen3"])
    assert ckpt.parent.name == content_hash(
        root / "qwen3", json.dumps({"params_dtype": None, "divisible_by": 16})
    )
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["real_vocab_size"] == TOKENS and meta["tp"] == 2
    assert not list((root / "cache").glob(".*"))  # no staging directory left behind


def test_teacher_and_student_with_different_rows_pair_up(run):
    _, ref, results = run
    for r in results:
        pairing = r["pairing"]
        assert pairing["rows"] == (WIDE, ROWS)
        assert pairing["padded"] == (112, 112) and pairing["shard"] == (56, 56)
        torch.testing.assert_close(pairing["teacher_logits"], ref["wide"], atol=1e-4, rtol=0)


def test_live_model_holds_only_the_tokenizer_rows(run):
    """Rows beyond the tokenizer are never built: nothing can sample them or give them loss mass."""
    _, _, results = run
    assert results[0]["live_rows"] == (TOKENS, 112)  # 100 padded to a multiple of lcm(16, TP=2)


@pytest.mark.parametrize("family", ["qwen3", "moe"])
def test_live_export_loads_in_transformers_with_same_logits_and_greedy(run, family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, ref, results = run
    out = root / f"{family}_live"
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.vocab_size == ROWS
    ids = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits[..., :TOKENS], ref[family], atol=1e-4, rtol=0)
        # Rows beyond the tokenizer hold weights (random here); a generator must suppress them, as the
        # Megatron side does by construction.
        greedy = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, eos_token_id=None,
            pad_token_id=0,
            suppress_tokens=list(range(TOKENS, ROWS)),
        )  # fmt: skip
    assert torch.equal(greedy, results[0][f"{family}_greedy"])
    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template([{"role": "user", "content": "w5"}], tokenize=False)
    assert text.startswith("<|im_start|>user\nw5<|im_end|>")


def test_rows_beyond_the_tokenizer_come_back_from_the_source(run):
    """Conversion keeps the source's rows beyond the tokenizer; an export given them writes them back
    unchanged (a round trip through training leaves them as they were); without them they are zeros."""
    root, _, results = run
    beyond = results[0]["beyond"]
    assert beyond["llama3"] is None  # as many rows as tokens: nothing to keep
    assert HFWeights(beyond["qwen3"]).names() == ["model.embed_tokens.weight"]  # tied: no lm_head
    name = "model.embed_tokens.weight"
    source, kept, zeros = (HFWeights(root / d).read(name) for d in ("qwen3", "qwen3_live_rows", "qwen3_live"))
    assert kept.shape == source.shape == (ROWS, 32)
    assert torch.equal(kept[TOKENS:], source[TOKENS:]) and source[TOKENS:].abs().sum() > 0
    torch.testing.assert_close(kept[:TOKENS], zeros[:TOKENS], atol=0, rtol=0)
    assert not zeros[112:].any()  # past the live model's padded rows


@pytest.mark.parametrize("family", ["qwen3", "llama3"])
def test_export_from_two_pipeline_stages(run, family):
    from transformers import AutoModelForCausalLM

    root, ref, _ = run
    out = root / f"{family}_pp2"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    assert index["weight_map"]["model.layers.1.input_layernorm.weight"] == "model-00002-of-00002.safetensors"
    src = HFWeights(root / family)
    back = HFWeights(out)
    assert sorted(back.names()) == sorted(
        n for n in src.names() if n != "lm_head.weight" or family == "llama3"
    )
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(_inputs()).logits[..., :TOKENS], ref[family], atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------------
# Unit tests (one process)
# ----------------------------------------------------------------------------------------------------


def test_llama3_frequencies_equal_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from opd_megatron.models.rope import rope_inv_freq

    rope = dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0,
                high_freq_factor=4.0, original_max_position_embeddings=8192)  # fmt: skip
    hf = LlamaConfig(hidden_size=2048, num_attention_heads=32, rope_parameters=rope)
    expected, scale = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    _, cfg = model_config_from_hf({**hf.to_dict(), "architectures": ["LlamaForCausalLM"]})
    assert cfg.rope_scaling == "llama3" and scale == 1.0
    torch.testing.assert_close(rope_inv_freq(cfg), expected.float(), atol=0, rtol=1e-6)
    linear = {
        **hf.to_dict(),
        "architectures": ["LlamaForCausalLM"],
        "rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 4.0},
    }
    _, cfg = model_config_from_hf(linear)
    expected, _ = ROPE_INIT_FUNCTIONS["linear"](
        LlamaConfig(**{k: v for k, v in linear.items() if k != "architectures"}), "cpu"
    )
    torch.testing.assert_close(rope_inv_freq(cfg), expected.float(), atol=0, rtol=1e-6)


def _llama_config(**rope) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "hidden_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 4, "intermediate_size": 48, "vocab_size": 10, "max_position_embeddings": 64,
            "rope_parameters": {"rope_theta": 1e4, **rope}}  # fmt: skip


def test_dynamic_rope_scaling_says_why():
    with pytest.raises(ConversionError, match="RoPE scaling 'dynamic' is not supported .*sequence's length"):
        model_config_from_hf(_llama_config(rope_type="dynamic", factor=2.0))


@pytest.mark.parametrize(
    "rope, fields",
    [
        # transformers' defaults: beta 32 / 1, attention factor from the factor alone
        ({"factor": 4.0, "original_max_position_embeddings": 16},
         {"rope_scaling_factor": 4.0, "rope_original_max_position": 16, "rope_yarn_beta_fast": 32.0,
          "rope_yarn_beta_slow": 1.0, "rope_yarn_mscale": None, "rope_yarn_mscale_all_dim": None}),
        # no factor: max_position_embeddings / original; no original: max_position_embeddings
        ({"original_max_position_embeddings": 16}, {"rope_scaling_factor": 4.0, "rope_original_max_position": 16}),
        ({"factor": 2.0}, {"rope_scaling_factor": 2.0, "rope_original_max_position": 64}),
        ({"factor": 8.0, "original_max_position_embeddings": 8, "beta_fast": 16, "beta_slow": 2, "mscale": 0.7,
          "mscale_all_dim": 0.3, "attention_factor": (1 + 0.07 * math.log(8)) / (1 + 0.03 * math.log(8))},
         {"rope_scaling_factor": 8.0, "rope_yarn_beta_fast": 16.0, "rope_yarn_beta_slow": 2.0,
          "rope_yarn_mscale": 0.7, "rope_yarn_mscale_all_dim": 0.3}),
    ],
)  # fmt: skip
def test_yarn_settings_map_both_ways(rope, fields):
    from opd_megatron.models.hf_convert import hf_config_from_model_config

    hf = _llama_config(rope_type="yarn", **rope)
    _, cfg = model_config_from_hf(hf)
    assert cfg.rope_scaling == "yarn"
    assert {k: getattr(cfg, k) for k in fields} == fields
    for base in (hf, None):  # exported over the imported config, and from scratch
        back = hf_config_from_model_config(cfg, 10, "LlamaForCausalLM", torch.float32, base)
        assert back["rope_parameters" if base else "rope_scaling"]["rope_type"] == "yarn"
        assert model_config_from_hf(back)[1] == cfg


@pytest.mark.parametrize(
    "rope, message",
    [
        ({"factor": 4.0, "attention_factor": 2.0}, "attention_factor=2.0 differs from the 1.13863"),
        ({"factor": 4.0, "truncate": False}, "truncate=false is not supported"),
        ({"factor": 4.0, "beta_fast": 1.0, "beta_slow": 2.0}, "rope_yarn_beta_slow: must be in"),
    ],
)
def test_yarn_settings_the_model_cannot_compute_are_refused(rope, message):
    with pytest.raises(ConversionError, match=message):
        model_config_from_hf(_llama_config(rope_type="yarn", **rope))


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen3_dir") / "qwen3"
    _make(d, "qwen3", 0)
    return d


def test_hf_dir_gives_model_and_tokenizer_configs(qwen3_dir, tmp_path):
    assert is_hf_dir(qwen3_dir) and not is_hf_dir(tmp_path) and not is_hf_dir(None)
    cfg, tok = config_from_dir(qwen3_dir)
    assert (cfg.head_dim, cfg.kv_channels, cfg.qk_layernorm, cfg.vocab_size) == (12, 12, True, ROWS)
    assert tok.kind == "hf" and tok.path == str(qwen3_dir.resolve())
    assert tok.chat_template == "model"  # the directory's own Jinja template


def test_hf_directory_chat_template_defaults(qwen3_dir, tmp_path):
    """The model's own template where the directory has one (in tokenizer_config.json or
    chat_template.jinja); plain without one; a SentencePiece model the built-in template its Jinja
    template's markers name (``model`` renders through an HF tokenizer directory only)."""
    from opd_megatron.models.hf_dir import guess_chat_template, tokenizer_config_from_hf

    none = _copy_dir(qwen3_dir, tmp_path / "none")
    (none / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    assert tokenizer_config_from_hf(none).chat_template == "plain"
    jinja = _copy_dir(none, tmp_path / "jinja")
    (jinja / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert tokenizer_config_from_hf(jinja).chat_template == "model"
    spm = _copy_dir(qwen3_dir, tmp_path / "spm", skip=("tokenizer.json",))
    (spm / "tokenizer.model").write_bytes(b"")  # only its name is read here
    assert tokenizer_config_from_hf(spm).kind == "sentencepiece"
    assert tokenizer_config_from_hf(spm).chat_template == guess_chat_template(qwen3_dir) == "chatml"


def test_merge_model_config_names_both_values(qwen3_dir):
    cfg, _ = config_from_dir(qwen3_dir)
    merged = merge_model_config({"params_dtype": "bf16", "num_layers": 2, "head_dim": 12}, cfg)
    assert merged.params_dtype == "bf16" and merged.num_layers == 2
    with pytest.raises(ConfigError, match=r"model\.hidden_size: given 64 but the HF config says 32"):
        merge_model_config({"hidden_size": 64}, cfg)
    # A ModelConfig counts its non-default fields as the ones the user wrote.
    with pytest.raises(ConfigError, match=r"model\.num_layers: given 3 but the HF config says 2"):
        merge_model_config(ModelConfig(num_layers=3, hidden_size=32, head_dim=12), cfg)


def test_run_config_mapping_takes_model_and_tokenizer_from_the_hf_directory(qwen3_dir):
    from opd_megatron.config import RunConfig, from_dict
    from opd_megatron.models.hf_dir import apply_hf_model_config

    raw = {"train": {"init_checkpoint": str(qwen3_dir)}, "model": {"params_dtype": "bf16"},
           "parallel": {"tensor_model_parallel_size": 2}}  # fmt: skip
    cfg = from_dict(RunConfig, apply_hf_model_config(raw))
    assert (cfg.model.hidden_size, cfg.model.head_dim, cfg.model.params_dtype) == (32, 12, "bf16")
    assert cfg.tokenizer.kind == "hf" and cfg.tokenizer.chat_template == "model"
    # A template the user chose is kept, with the directory's tokenizer.
    chosen = from_dict(RunConfig, apply_hf_model_config({**raw, "tokenizer": {"chat_template": "chatml"}}))
    assert (chosen.tokenizer.chat_template, chosen.tokenizer.path) == ("chatml", str(qwen3_dir.resolve()))
    plain = {"train": {"init_checkpoint": "runs/x/checkpoints"}}
    assert apply_hf_model_config(plain) is plain
    with pytest.raises(ConfigError, match=r"model\.num_attention_heads: given 8 but the HF config says 4"):
        apply_hf_model_config({**raw, "model": {"num_attention_heads": 8}})


def _padded_elsewhere(rank, hf_dir: str, cache: str, divisible_by: int):
    """A run of an HF directory with its own ``make_vocab_size_divisible_by`` loads the conversion
    (padded at 16) and computes transformers' logits."""
    from transformers import AutoModelForCausalLM

    from opd_megatron.config import ParallelConfig, RunConfig, from_dict
    from opd_megatron.distributed import init_distributed
    from opd_megatron.models.checkpoint import load_model_weights
    from opd_megatron.models.gpt import build_gpt_model
    from opd_megatron.models.hf_dir import apply_hf_model_config
    from opd_megatron.tokenization import load_tokenizer

    raw = {"train": {"init_checkpoint": hf_dir}, "model": {"make_vocab_size_divisible_by": divisible_by}}
    cfg = from_dict(RunConfig, apply_hf_model_config(raw))
    groups = init_distributed(ParallelConfig())
    converted = materialise(hf_dir, groups, cache)
    tok = load_tokenizer(cfg.tokenizer)
    model = build_gpt_model(cfg.model, groups, tok.vocab_size, seed=3)
    load_model_weights(converted.checkpoint, model)
    ids = torch.randint(0, tok.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.eval()(ids, torch.arange(9).expand_as(ids), None)[..., : tok.vocab_size]
        ref = AutoModelForCausalLM.from_pretrained(hf_dir).eval()(ids).logits[..., : tok.vocab_size]
    conv_rows = converted.model.vocab_size
    return cfg.model.make_vocab_size_divisible_by, model.padded_vocab_size, conv_rows, ours, ref


def test_make_vocab_size_divisible_by_is_the_runs_choice(tmp_path):
    from tests.hf_model_dirs import tiny_qwen3_dir

    hf_dir = tiny_qwen3_dir(tmp_path / "qwen3", seed=5, extra_rows=20)  # 500 tokens, 520 rows
    args = (str(hf_dir), str(tmp_path / "cache"), 64)
    divisible_by, padded, rows, ours, ref = run_ranks(_padded_elsewhere, 1, timeout=300, args=args)[0]
    assert (divisible_by, padded, rows) == (64, 512, 520)  # the conversion's embedding: 528 rows (16)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def _copy_dir(src: Path, dst: Path, skip=()) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.name not in skip:
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_bad_hf_directories_fail_with_one_line_naming_the_file(qwen3_dir, tmp_path):
    """Each is rejected before any process group is touched (``groups`` is never read)."""
    no_tok = _copy_dir(qwen3_dir, tmp_path / "no_tok", skip=("tokenizer.json",))
    with pytest.raises(
        ConfigError, match=r"^teachers\[0\]\.checkpoint: .*no_tok: no tokenizer\.json or tokenizer\.model"
    ):
        materialise(no_tok, None, tmp_path / "cache", where="teachers[0].checkpoint")

    arch = _copy_dir(qwen3_dir, tmp_path / "arch")
    cfg = json.loads((arch / "config.json").read_text())
    (arch / "config.json").write_text(json.dumps({**cfg, "architectures": ["MixtralForCausalLM"]}))
    with pytest.raises(
        ConfigError, match=r"arch/config\.json: unsupported architecture \['MixtralForCausalLM'\]"
    ):
        materialise(arch, None, tmp_path / "cache")

    layers = _copy_dir(qwen3_dir, tmp_path / "layers")
    (layers / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(
        ConfigError, match=r"tensors required by config\.json are missing: model\.layers\.2\."
    ):
        materialise(layers, None, tmp_path / "cache")

    heads = _copy_dir(qwen3_dir, tmp_path / "heads")
    (heads / "config.json").write_text(json.dumps({**cfg, "head_dim": 8}))
    with pytest.raises(
        ConfigError, match=r"q_proj\.weight has shape \[48, 32\] but config\.json implies \[32, 32\]"
    ):
        materialise(heads, None, tmp_path / "cache")

    small = _copy_dir(qwen3_dir, tmp_path / "small")
    (small / "config.json").write_text(json.dumps({**cfg, "vocab_size": 90}))
    with pytest.raises(
        ConfigError, match=r"embed_tokens\.weight has shape \[120, 32\] but config\.json implies \[90, 32\]"
    ):
        materialise(small, None, tmp_path / "cache")
    for err_dir in ("no_tok", "arch", "layers", "heads", "small"):
        assert not (tmp_path / "cache").exists(), err_dir


def test_content_hash_follows_bytes_not_paths(qwen3_dir, tmp_path):
    copy = _copy_dir(qwen3_dir, tmp_path / "copy")
    assert content_hash(copy) == content_hash(qwen3_dir)
    cfg = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 1e-6}))
    assert content_hash(copy) != content_hash(qwen3_dir)


def _published(arch, **fields):
    base = {"architectures": [arch], "vocab_size": 151936, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0}
    return {**base, **fields}


@pytest.mark.parametrize(
    "hf, params, head_dim",
    [
        # Public config.json values of released checkpoints; parameter counts as published (rounded).
        (_published("Qwen3ForCausalLM", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
         8.19e9, 128),
        (_published("Qwen3ForCausalLM", hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
         4.02e9, 128),
        (_published("Qwen3MoeForCausalLM", hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
                    num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                    num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
                    tie_word_embeddings=False),
         30.5e9, 128),
        (_published("LlamaForCausalLM", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                    rope_theta=500000.0),
         8.03e9, 128),
    ],
)  # fmt: skip
def test_released_configs_map_to_their_published_sizes(hf, params, head_dim):
    import math

    from opd_megatron.models.hf_convert import hf_tensor_shapes

    _, cfg = model_config_from_hf(hf)
    assert cfg.kv_channels == head_dim
    total = sum(math.prod(s) for s in hf_tensor_shapes(cfg).values())
    assert total == pytest.approx(params, rel=0.01)
