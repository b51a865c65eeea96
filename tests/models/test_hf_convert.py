"""HF <-> Megatron conversion: exact round trips and logits equal to ``transformers`` at TP=1 and TP=2.

Tiny Llama (untied, converted at TP=2) and Qwen2 (tied, QKV bias, sharded safetensors, converted at PP=2)
models are built locally from a config with random weights. Process start-up dominates on CPU, so all
multi-rank work runs once in a module-scoped fixture and the tests check what it recorded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from opd_megatron.models.hf_convert import (
    ConversionError,
    fuse_qkv,
    hf_config_from_model_config,
    model_config_from_hf,
    split_qkv,
    validate_hf_weights,
)
from opd_megatron.models.hf_safetensors import HFWeights, PlannedTensor, write_sharded
from tests.multirank import run_ranks

VOCAB = 100  # padded to 112: the padding rows are exercised
SEQ = 12
REPO = Path(__file__).resolve().parents[2]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _hf_kwargs(**over):
    kw = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=50000.0,
    )
    kw.update(over)
    return kw


def _write_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": 64, "eos_token": "</s>"})
    )
    (directory / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))


def _make_hf_model(directory: Path, arch: str, seed: int):
    """Save a random tiny HF model (norms and biases random too, so a mix-up cannot hide) and return it."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**_hf_kwargs(tie_word_embeddings=False)))
        shard = "1GB"
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**_hf_kwargs(tie_word_embeddings=True)))
        shard = "40KB"  # several shards and an index: the sharded reader is exercised
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.3 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)
    model.eval()
    model.save_pretrained(directory, max_shard_size=shard)
    _write_tokenizer(directory)
    return model


def _inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, VOCAB, (2, SEQ), generator=g)


# ----------------------------------------------------------------------------------------------------
# Multi-rank worker (module level: pickled by name into the spawned processes)
# ----------------------------------------------------------------------------------------------------


def _full_logits(groups, ckpt) -> torch.Tensor:
    """Logits ``[b, s, VOCAB]`` of the checkpoint loaded at the current layout, on every rank."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from opd_megatron.distributed.pipeline import broadcast_from_last_stage, pipeline_forward
    from opd_megatron.models.checkpoint import load_model_weights, read_config, resolve_checkpoint
    from opd_megatron.models.gpt import build_gpt_model

    ckpt = resolve_checkpoint(ckpt)  # the conversion root holds step_0000000
    model = build_gpt_model(read_config(ckpt).model, groups, seed=321)  # weights must come from disk
    load_model_weights(ckpt, model)
    ids = _inputs()
    with torch.no_grad():
        out = pipeline_forward(model.eval(), ids, torch.arange(SEQ).expand_as(ids), groups)
        full = gather_from_tensor_model_parallel_region(out) if groups.is_last_stage else None
    shape = (*ids.shape, model.padded_vocab_size)
    return broadcast_from_last_stage(full, shape, torch.float32, groups)[..., :VOCAB].clone()


def _convert_everything(rank, root):
    """Import Llama at TP=2 and Qwen2 at PP=2, score both at TP=2 and TP=1, export both, then run the CLI
    under a 2-rank launch (``--tp 2``), as torchrun would."""
    from opd_megatron.cli import main
    from opd_megatron.config import ParallelConfig
    from opd_megatron.distributed import init_distributed
    from opd_megatron.models.hf_convert import export_hf_checkpoint, import_hf_checkpoint

    root = Path(root)
    out = {}

    def layout(tp=1, pp=1):
        return init_distributed(
            ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        )

    out["llama_ckpt"] = str(import_hf_checkpoint(root / "llama_hf", root / "llama_meg", layout(tp=2)))
    out["qwen_ckpt"] = str(import_hf_checkpoint(root / "qwen_hf", root / "qwen_meg", layout(pp=2)))
    groups = layout(tp=2)
    for arch in ("llama", "qwen"):
        out[f"{arch}_tp2"] = _full_logits(groups, root / f"{arch}_meg")
    groups = layout(tp=1)  # two data-parallel replicas: both load, rank 0 writes
    for arch in ("llama", "qwen"):
        out[f"{arch}_tp1"] = _full_logits(groups, root / f"{arch}_meg")
    export_hf_checkpoint(root / "llama_meg", root / "llama_back", groups)
    export_hf_checkpoint(root / "qwen_meg", root / "qwen_back", groups, max_shard_size="40KB")
    out["cli"] = main(
        ["convert", "hf-to-megatron", str(root / "llama_hf"), str(root / "llama_cli"), "--tp", "2"]
    )
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_convert")
    hf = {arch: _make_hf_model(root / f"{arch}_hf", arch, seed) for arch, seed in (("llama", 0), ("qwen", 1))}
    ref = {}
    with torch.no_grad():
        for arch, model in hf.items():
            ref[arch] = model(_inputs()).logits
    results = run_ranks(_convert_everything, 2, timeout=540, args=(str(root),))
    return root, ref, results


# ----------------------------------------------------------------------------------------------------
# End-to-end tests
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen"])
@pytest.mark.parametrize("tp", [1, 2])
def test_logits_equal_transformers(converted, arch, tp):
    _, ref, results = converted
    assert ref[arch].abs().max() > 0.5  # logits large enough for the tolerance to mean something
    for rank_out in results:
        torch.testing.assert_close(rank_out[f"{arch}_tp{tp}"], ref[arch], atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen"])
def test_round_trip_gives_identical_tensors(converted, arch):
    root, _, _ = converted
    src, back = HFWeights(root / f"{arch}_hf"), HFWeights(root / f"{arch}_back")
    assert sorted(src.names()) == sorted(back.names())
    for name in src.names():
        a, b = src.read(name), back.read(name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    if arch == "qwen":  # sharded on the way back too
        assert (root / "qwen_back" / "model.safetensors.index.json").is_file()
        assert "lm_head.weight" not in back.names()  # tied: HF does not store it


@pytest.mark.parametrize("arch", ["llama", "qwen"])
def test_exported_model_loads_in_transformers(converted, arch):
    from transformers import AutoModelForCausalLM

    root, ref, _ = converted
    model = AutoModelForCausalLM.from_pretrained(root / f"{arch}_back").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(_inputs()).logits, ref[arch], atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen"])
def test_side_files_travel_both_ways(converted, arch):
    root, _, results = converted
    ckpt = Path(results[0][f"{arch}_ckpt"])
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        original = (root / f"{arch}_hf" / name).read_bytes()
        assert (ckpt / "hf" / name).read_bytes() == original, name
        assert (root / f"{arch}_back" / name).read_bytes() == original, name
    src = json.loads((root / f"{arch}_hf" / "config.json").read_text())
    back = json.loads((root / f"{arch}_back" / "config.json").read_text())
    for key in ("architectures", "hidden_size", "num_key_value_heads", "vocab_size", "tie_word_embeddings"):
        assert back[key] == src[key], key
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["real_vocab_size"] == VOCAB
    assert (meta["tp"], meta["pp"]) == ((2, 1) if arch == "llama" else (1, 2))


def test_cli_converts_at_tp2_and_tools_export(converted, tmp_path):
    root, ref, results = converted
    assert [r["cli"] for r in results] == [0, 0]
    meta = json.loads((root / "llama_cli" / "step_0000000" / "meta.json").read_text())
    assert meta["tp"] == 2
    out = tmp_path / "back"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "convert_megatron_to_hf.py"),
            str(root / "llama_cli"),
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    src, back = HFWeights(root / "llama_hf"), HFWeights(out)
    assert all(torch.equal(src.read(n), back.read(n)) for n in src.names())


def test_cli_rejects_unsupported_architecture(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"architectures": ["MixtralForCausalLM"], "hidden_size": 8}))
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "convert_hf_to_megatron.py"), str(hf), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "unsupported architecture ['MixtralForCausalLM']" in proc.stderr
    assert "LlamaForCausalLM" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------
# Unit tests (one process, no distributed setup)
# ----------------------------------------------------------------------------------------------------


def test_fuse_qkv_groups_query_heads_with_their_kv_head():
    heads, groups, d, h = 8, 2, 3, 5
    q, k, v = torch.randn(heads * d, h), torch.randn(groups * d, h), torch.randn(groups * d, h)
    fused = fuse_qkv(q, k, v, heads, groups)
    # Megatron views the fused output as [groups, (heads/groups + 2) * d] and splits each group into
    # its query heads, then one key and one value head.
    per_group = fused.view(groups, heads // groups + 2, d, h)
    for g in range(groups):
        for j in range(heads // groups):
            assert torch.equal(per_group[g, j], q.view(heads, d, h)[g * heads // groups + j])
        assert torch.equal(per_group[g, -2], k.view(groups, d, h)[g])
        assert torch.equal(per_group[g, -1], v.view(groups, d, h)[g])
    for a, b in zip(split_qkv(fused, heads, groups), (q, k, v)):
        assert torch.equal(a, b)
    bias = [torch.randn(n * d) for n in (heads, groups, groups)]
    assert all(
        torch.equal(a, b) for a, b in zip(split_qkv(fuse_qkv(*bias, heads, groups), heads, groups), bias)
    )


def test_tp_shard_of_fused_qkv_is_fusion_of_row_shards():
    heads, groups, d, h, tp = 8, 4, 2, 3, 2
    q, k, v = torch.randn(heads * d, h), torch.randn(groups * d, h), torch.randn(groups * d, h)
    full = fuse_qkv(q, k, v, heads, groups)
    for r in range(tp):
        local = fuse_qkv(q.chunk(tp)[r], k.chunk(tp)[r], v.chunk(tp)[r], heads // tp, groups // tp)
        assert torch.equal(local, full.chunk(tp)[r])


def _llama_config(**over) -> dict:
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **_hf_kwargs(),
        "torch_dtype": "bfloat16",
    }
    cfg.update(over)
    return cfg


def test_config_mapping_llama_and_qwen2():
    arch, cfg = model_config_from_hf(_llama_config())
    assert arch == "LlamaForCausalLM"
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.query_groups) == (2, 64, 4, 2)
    assert (cfg.ffn_size, cfg.vocab_size, cfg.max_sequence_length) == (96, VOCAB, 64)
    assert (cfg.rotary_base, cfg.norm_epsilon, cfg.params_dtype) == (50000.0, 1e-5, "bf16")
    assert not cfg.tie_embeddings and not cfg.add_qkv_bias
    # transformers >= 5 writes RoPE settings as rope_parameters
    qwen = {**_llama_config(architectures=["Qwen2ForCausalLM"], tie_word_embeddings=True)}
    qwen.pop("rope_theta")
    qwen["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0}
    arch, cfg = model_config_from_hf(qwen, params_dtype="fp32")
    assert arch == "Qwen2ForCausalLM" and cfg.add_qkv_bias and cfg.tie_embeddings
    assert cfg.rotary_base == 1e6 and cfg.params_dtype == "fp32"
    # and back: the fields the weights depend on survive
    hf = hf_config_from_model_config(cfg, VOCAB, arch, torch.float32, base=qwen)
    assert hf["rope_parameters"]["rope_theta"] == 1e6 and hf["num_key_value_heads"] == 2
    assert model_config_from_hf(hf)[1] == cfg


@pytest.mark.parametrize(
    "over, message",
    [
        ({"architectures": ["MistralForCausalLM"]}, "unsupported architecture"),
        (
            {"rope_scaling": {"rope_type": "dynamic", "factor": 8.0}},
            "RoPE scaling 'dynamic' is not supported",
        ),
        (
            {"rope_scaling": {"rope_type": "longrope", "factor": 8.0}},
            "RoPE scaling 'longrope' is not supported",
        ),
        (
            {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
            "RoPE scaling 'llama3' lacks 'low_freq_factor'",
        ),
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        (
            {"hidden_size": 66},
            "hidden_size=66 is not divisible by num_attention_heads=4 and there is no head_dim",
        ),
        ({"num_key_value_heads": 3}, "num_query_groups"),
        ({"vocab_size": None}, "lacks vocab_size"),
    ],
)
def test_unsupported_configs_fail_clearly(over, message):
    with pytest.raises(ConversionError, match=message.replace("[", r"\[").replace("(", r"\(")):
        model_config_from_hf(_llama_config(**over))


def test_export_refuses_bias_for_llama():
    _, cfg = model_config_from_hf(_llama_config(architectures=["Qwen2ForCausalLM"]))
    with pytest.raises(ConversionError, match="choose the other architecture"):
        hf_config_from_model_config(cfg, VOCAB, "LlamaForCausalLM", torch.float32)


def _write_weights(directory: Path, tensors: dict[str, torch.Tensor], max_bytes: int = 10**9) -> None:
    plan = [PlannedTensor(n, tuple(t.shape), t.dtype, lambda t=t: t) for n, t in tensors.items()]
    write_sharded(directory, plan, max_bytes)


def _llama_tensors(cfg) -> dict[str, torch.Tensor]:
    from opd_megatron.models.hf_convert import hf_tensor_shapes

    return {n: torch.randn(s) for n, s in hf_tensor_shapes(cfg).items()}


def test_weights_that_disagree_with_config_are_named(tmp_path):
    _, cfg = model_config_from_hf(_llama_config())
    tensors = _llama_tensors(cfg)
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.randn(64, 64)  # MHA weights, GQA config
    _write_weights(tmp_path / "shape", tensors)
    with pytest.raises(
        ConversionError,
        match=r"model.layers.1.self_attn.k_proj.weight has shape \[64, 64\] but config.json implies \[32, 64\]",
    ):
        validate_hf_weights(HFWeights(tmp_path / "shape"), cfg)

    tensors = _llama_tensors(cfg)
    del tensors["lm_head.weight"]
    _write_weights(tmp_path / "missing", tensors)
    with pytest.raises(ConversionError, match="missing: lm_head.weight"):
        validate_hf_weights(HFWeights(tmp_path / "missing"), cfg)

    _, one_layer = model_config_from_hf(_llama_config(num_hidden_layers=1))
    _write_weights(tmp_path / "extra", _llama_tensors(cfg))
    with pytest.raises(ConversionError, match=r"not described by config.json .*model.layers.1"):
        validate_hf_weights(HFWeights(tmp_path / "extra"), one_layer)

    with pytest.raises(ConversionError, match="no model.safetensors"):
        HFWeights(tmp_path / "nothing")


def test_sharded_writer_bounds_shards_and_reads_back(tmp_path):
    tensors = {f"t{i}": torch.randn(10, 7).to(dt) for i, dt in enumerate([torch.float32, torch.bfloat16] * 3)}
    _write_weights(tmp_path / "many", tensors, max_bytes=600)  # 280 or 140 bytes per tensor
    files = sorted(p.name for p in (tmp_path / "many").glob("*.safetensors"))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    back = HFWeights(tmp_path / "many")
    for name, t in tensors.items():
        assert torch.equal(back.read(name), t)
        assert torch.equal(back.read(name, 1, 2, 5), t[:, 2:5])  # a tensor-parallel column shard
    _write_weights(tmp_path / "one", tensors)
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["model.safetensors"]


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
def test_config_written_without_an_imported_one_reads_back_in_transformers(arch):
    """A checkpoint trained here from scratch has no HF config to start from: the generated one must
    describe the same model to transformers."""
    from transformers import AutoConfig

    from opd_megatron.config import ModelConfig

    cfg = ModelConfig(
        num_layers=3, hidden_size=96, num_attention_heads=6, num_query_groups=2, ffn_hidden_size=160,
        rotary_base=500000.0, norm_epsilon=1e-6, tie_embeddings=False, add_qkv_bias=arch.startswith("Qwen2"),
    )  # fmt: skip
    hf = hf_config_from_model_config(cfg, 77, arch, torch.bfloat16)
    loaded = AutoConfig.for_model(**hf)
    assert type(loaded).__name__ == arch.replace("ForCausalLM", "Config")
    assert (loaded.num_hidden_layers, loaded.num_key_value_heads, loaded.intermediate_size) == (3, 2, 160)
    assert loaded.rope_parameters["rope_theta"] == 500000.0 and loaded.vocab_size == 77
    assert not loaded.tie_word_embeddings
    assert model_config_from_hf(hf)[1] == ModelConfig(
        **{**cfg.__dict__, "vocab_size": 77, "params_dtype": "bf16"}
    )
