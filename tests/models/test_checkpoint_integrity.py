"""Checkpoint integrity: the manifest, each kind of damage found and named, fallback to the newest intact
checkpoint, the pruning rule, run identity, and loading errors that name the checkpoint."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import yaml

from opd_megatron.config import ModelConfig, RunConfig, TokenizerConfig
from opd_megatron.models.checkpoint import (
    CheckpointError,
    check_run_identity,
    find_resume_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    resolve_checkpoint,
    verified_checkpoint,
    verify_checkpoint,
)
from opd_megatron.models.manifest import MANIFEST_NAME
from tests.cli_process import one_error_line, run_cli
from tests.multirank import run_ranks

SMALL = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=2, max_sequence_length=32)


def _config(**model) -> RunConfig:
    return RunConfig(name="integrity", model=ModelConfig(**{**SMALL.__dict__, **model}))


def _save_steps(rank, root, keep_last):
    """Steps 1..3 of a tiny model (weights differ per step), with rank state, config, tokenizer, job."""
    import torch

    from opd_megatron.config import ParallelConfig
    from opd_megatron.distributed import init_distributed
    from opd_megatron.models.checkpoint import save_checkpoint
    from opd_megatron.models.gpt import build_gpt_model
    from opd_megatron.tokenization import CharTokenizer

    groups = init_distributed(ParallelConfig())
    tok = CharTokenizer()
    cfg = _config()
    model = build_gpt_model(cfg.model, groups, tok.vocab_size, seed=3)
    for step in (1, 2, 3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
        state = {"step": step, "rng": torch.arange(4)}
        save_checkpoint(root, step, model, groups, config=cfg, tokenizer=tok, rank_state=state,
                        keep_last=keep_last, job="sft")  # fmt: skip
    return [p.name for p in list_checkpoints(root)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ckpts") / "checkpoints"
    assert run_ranks(_save_steps, 1, timeout=240, args=(str(root), 0))[0] == [
        "step_0000001", "step_0000002", "step_0000003"
    ]  # fmt: skip
    return root


@pytest.fixture
def root(saved, tmp_path) -> Path:
    """A private copy of the three checkpoints, free to damage."""
    return Path(shutil.copytree(saved, tmp_path / "checkpoints"))


def test_a_fresh_checkpoint_has_a_manifest_of_every_file_and_verifies(root):
    ckpt = root / "step_0000003"
    files = json.loads((ckpt / MANIFEST_NAME).read_text())["files"]
    assert {"meta.json", "config.yaml", "model/.metadata", "rank_state/rank_00000.pt"} <= set(files)
    assert any(name.endswith(".distcp") for name in files)
    on_disk = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()} - {MANIFEST_NAME}
    assert set(files) == on_disk
    assert all(files[f]["size"] == (ckpt / f).stat().st_size for f in files)
    assert verify_checkpoint(ckpt) == [] and verify_checkpoint(ckpt, checksums=False) == []
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["format"] == 2 and meta["identity"]["job"] == "sft"
    assert meta["identity"]["fields"]["model.hidden_size"] == 32


def _overwrite(rel, data):
    def damage(ckpt):
        with open(ckpt / rel, "r+b") as fh:
            fh.seek(1024)
            fh.write(data)

    return damage


def _truncate(rel, keep):
    def damage(ckpt):
        with open(ckpt / rel, "r+b") as fh:
            fh.truncate(keep)

    return damage


def _write(rel, text):
    return lambda ckpt: (ckpt / rel).write_bytes(text)


def _delete(rel):
    return lambda ckpt: (ckpt / rel).unlink()


NAN_4K = struct.pack("<f", float("nan")) * 1024
FINITE_4K = struct.pack("<f", 0.5) * 1024

# (case, damage, the problem named, found by a sizes-only check too)
DAMAGES = [
    ("NaN bytes in a shard", _overwrite("model/__0_0.distcp", NAN_4K), "model/__0_0.distcp: checksum mismatch", False),
    ("finite bytes in a shard", _overwrite("model/__0_1.distcp", FINITE_4K), "model/__0_1.distcp: checksum mismatch", False),
    ("truncated shard", _truncate("model/__0_0.distcp", 5000), "model/__0_0.distcp: 5000 bytes, the manifest says", True),
    ("empty rank state", _truncate("rank_state/rank_00000.pt", 0), "rank_state/rank_00000.pt: empty, the manifest says", True),
    ("bad meta.json", _write("meta.json", b'{"step": 3, '), "meta.json: unparsable (JSONDecodeError", True),
    ("meta.json not a meta", _write("meta.json", b"[3]"), "meta.json: not a checkpoint's meta", True),
    ("meta.json deleted", _delete("meta.json"), "meta.json: missing", True),
    ("model/.metadata deleted", _delete("model/.metadata"), "model/.metadata: missing", True),
    ("config.yaml edited", _write("config.yaml", b"name: other\n"), "config.yaml: ", True),
    ("manifest deleted", _delete(MANIFEST_NAME), "manifest.json: missing", True),
    ("manifest garbage", _write(MANIFEST_NAME, b"\x00\x01"), "manifest.json: unreadable", True),
    ("manifest without files", _write(MANIFEST_NAME, b'{"files": [1]}'), "manifest.json: not a manifest", True),
]  # fmt: skip


@pytest.mark.parametrize("case,damage,problem,by_size", DAMAGES, ids=[d[0] for d in DAMAGES])
def test_each_damage_is_named_and_resume_falls_back_to_the_previous_checkpoint(
    root, case, damage, problem, by_size
):
    newest = root / "step_0000003"
    damage(newest)
    problems = verify_checkpoint(newest)
    assert len(problems) == 1 and problems[0].startswith(problem), problems
    assert bool(verify_checkpoint(newest, checksums=False)) == by_size
    reports: list[str] = []
    assert find_resume_checkpoint(root, report=reports.append) == root / "step_0000002"
    assert reports[0].startswith(f"checkpoint {newest} is damaged and will not be used: {problem}")
    assert reports[1] == "resuming from step_0000002, the newest intact checkpoint"


def test_no_intact_checkpoint_is_a_checkpoint_error_and_no_checkpoint_is_none(root, tmp_path):
    _truncate("model/__0_0.distcp", 10)(root / "step_0000003")
    _delete("model/.metadata")(root / "step_0000002")
    _write("meta.json", b"")(root / "step_0000001")
    with pytest.raises(CheckpointError) as err:
        find_resume_checkpoint(root, report=lambda _: None)
    message = str(err.value)
    assert message.startswith(f"no intact checkpoint in {root}: step_0000003 (model/__0_0.distcp: 10 bytes")
    assert (
        "step_0000002 (model/.metadata: missing)" in message
        and "step_0000001 (meta.json: unparsable" in message
    )
    assert "\n" not in message
    assert find_resume_checkpoint(tmp_path / "nothing-here") is None


def test_resolving_a_damaged_checkpoint_by_name_fails_and_a_root_falls_back(root):
    _truncate("rank_state/rank_00000.pt", 0)(root / "step_0000003")
    with pytest.raises(CheckpointError, match=r"step_0000003 is damaged: rank_state/rank_00000.pt: empty"):
        resolve_checkpoint(root / "step_0000003")
    assert resolve_checkpoint(root) == root / "step_0000002"
    assert resolve_checkpoint(root.parent) == root / "step_0000002"  # a run directory


def test_pruning_keeps_intact_checkpoints_and_never_the_future(root):
    # keep_last=2 after saving step 3: step 2 stays, step 1 goes.
    assert prune_checkpoints(root, 2, root / "step_0000003") == [root / "step_0000001"]
    assert [p.name for p in list_checkpoints(root)] == ["step_0000002", "step_0000003"]


def test_pruning_skips_a_damaged_checkpoint_when_counting(root):
    _overwrite("model/__0_0.distcp", FINITE_4K)(root / "step_0000002")  # invisible to a sizes check
    _truncate("model/__0_0.distcp", 100)(root / "step_0000002")  # visible
    deleted = prune_checkpoints(root, 2, root / "step_0000003")
    assert deleted == [root / "step_0000002"]  # the damaged one goes; the intact step 1 is the one kept
    assert [p.name for p in list_checkpoints(root)] == ["step_0000001", "step_0000003"]


def test_pruning_deletes_nothing_when_the_new_checkpoint_does_not_verify(root):
    _delete("model/.metadata")(root / "step_0000003")
    assert prune_checkpoints(root, 1, root / "step_0000003") == []
    assert len(list_checkpoints(root)) == 3


def test_pruning_leaves_later_steps_of_an_earlier_run_alone(root):
    # A finished 3-step run resumed with fewer steps saves step 2 again: step 3 is not its to delete.
    assert prune_checkpoints(root, 1, root / "step_0000002") == [root / "step_0000001"]
    assert [p.name for p in list_checkpoints(root)] == ["step_0000002", "step_0000003"]
    assert prune_checkpoints(root, 0, root / "step_0000002") == []


def test_save_checkpoint_prunes_with_keep_last(tmp_path):
    assert run_ranks(_save_steps, 1, timeout=240, args=(str(tmp_path / "c"), 2))[0] == [
        "step_0000002", "step_0000003"
    ]  # fmt: skip


def test_run_identity_names_the_changed_fields(root):
    ckpt = root / "step_0000003"
    assert check_run_identity(ckpt, _config(), "sft") == []
    # The loss does not define an SFT run: changing it is allowed.
    changed = _config()
    changed.loss.objective = "minillm"
    assert check_run_identity(ckpt, changed, "sft") == []
    other = _config(hidden_size=64, num_layers=2)
    other.tokenizer.kind = "sentencepiece"
    with pytest.raises(CheckpointError) as err:
        check_run_identity(ckpt, other, "opd")
    message = str(err.value)
    assert message.startswith(f"checkpoint {ckpt} was written by a different run (job: sft -> opd; ")
    for change in (
        "model.hidden_size: 32 -> 64",
        "model.num_layers: 1 -> 2",
        "tokenizer.kind: 'char' -> 'sentencepiece'",
    ):
        assert change in message
    assert "train.resume: force" in message and "\n" not in message
    reports: list[str] = []
    forced = check_run_identity(ckpt, other, "opd", force=True, report=reports.append)
    assert "model.hidden_size: 32 -> 64" in forced and "forced" in reports[0]


# Fields that change the model, each with a value other than its default.
MODEL_CHANGES = [
    ("head_dim", 8), ("qk_layernorm", True), ("rope_scaling", "linear"), ("rope_scaling_factor", 2.0),
    ("rope_low_freq_factor", 2.0), ("rope_high_freq_factor", 8.0), ("rope_original_max_position", 64),
    ("num_experts", 4), ("moe_router_topk", 1), ("moe_norm_topk_prob", False), ("moe_ffn_hidden_size", 16),
]  # fmt: skip


@pytest.mark.parametrize("field,value", MODEL_CHANGES, ids=[c[0] for c in MODEL_CHANGES])
def test_run_identity_covers_every_field_that_changes_the_model(root, field, value):
    import dataclasses

    ckpt = root / "step_0000003"
    changed = _config()
    # A factor applies only with its scaling on, the expert fields only to a mixture of experts.
    extra = {"rope_scaling": "llama3"} if field.startswith(("rope_low", "rope_high", "rope_orig")) else {}
    extra.update({"num_experts": 4} if field.startswith("moe_") else {})
    changed.model = dataclasses.replace(changed.model, **extra, **{field: value})
    with pytest.raises(CheckpointError, match=rf"model\.{field}: .* -> {value!r}"):
        check_run_identity(ckpt, changed, "sft")


def test_run_identity_covers_the_template_variables(root):
    ckpt = root / "step_0000003"
    changed = _config()
    changed.tokenizer = TokenizerConfig(kind="hf", path="tok", chat_template="model",
                                        template_kwargs={"enable_thinking": False})  # fmt: skip
    with pytest.raises(
        CheckpointError, match=r"tokenizer\.template_kwargs: \{\} -> \{'enable_thinking': False\}"
    ):
        check_run_identity(ckpt, changed, "sft")


def test_an_identity_without_the_newer_fields_compares_them_as_saved_or_default(root):
    ckpt = root / "step_0000003"
    meta = json.loads((ckpt / "meta.json").read_text())
    newer = ("model.head_dim", "model.qk_layernorm", "model.num_experts", "tokenizer.template_kwargs")
    for path in newer:  # as a checkpoint written before these fields were part of the identity
        del meta["identity"]["fields"][path]
    meta["identity"]["hash"] = "older"
    (ckpt / "meta.json").write_text(json.dumps(meta))
    assert check_run_identity(ckpt, _config(), "sft") == []  # the defaults: still the same run
    with pytest.raises(CheckpointError, match=r"model\.qk_layernorm: False -> True"):
        check_run_identity(ckpt, _config(qk_layernorm=True), "sft")
    # The checkpoint's config.yaml says what the run had: that is what a missing field compares as.
    saved = yaml.safe_load((ckpt / "config.yaml").read_text())
    saved["model"]["qk_layernorm"] = True
    (ckpt / "config.yaml").write_text(yaml.safe_dump(saved))
    assert check_run_identity(ckpt, _config(qk_layernorm=True), "sft") == []
    with pytest.raises(CheckpointError, match=r"model\.qk_layernorm: True -> False"):
        check_run_identity(ckpt, _config(), "sft")


def test_a_checkpoint_without_identity_has_nothing_to_compare(root):
    ckpt = root / "step_0000003"
    meta = json.loads((ckpt / "meta.json").read_text())
    del meta["identity"], meta["format"]  # as saved before run identities and manifests
    (ckpt / "meta.json").write_text(json.dumps(meta))
    (ckpt / MANIFEST_NAME).unlink()
    assert check_run_identity(ckpt, _config(hidden_size=64), "opd") == []
    assert verify_checkpoint(ckpt) == []  # structural checks only
    _truncate("rank_state/rank_00000.pt", 0)(ckpt)
    assert verify_checkpoint(ckpt) == ["rank_state/rank_00000.pt: empty"]


def _load_errors(rank, ckpt):
    """Load into a model of another width, then a rank state that is garbage: both CheckpointErrors."""
    from opd_megatron.config import ParallelConfig
    from opd_megatron.distributed import init_distributed
    from opd_megatron.models.checkpoint import load_model_weights, load_rank_state
    from opd_megatron.models.gpt import build_gpt_model
    from opd_megatron.tokenization import CharTokenizer

    groups = init_distributed(ParallelConfig())
    wider = build_gpt_model(_config(hidden_size=64).model, groups, CharTokenizer().vocab_size, seed=3)
    out = []
    try:
        load_model_weights(ckpt, wider)
    except CheckpointError as e:
        out.append(str(e))
    state_file = Path(ckpt) / "rank_state" / "rank_00000.pt"
    state_file.write_bytes(b"x" * state_file.stat().st_size)  # same size: only reading it finds out
    try:
        load_rank_state(ckpt, groups)
    except CheckpointError as e:
        out.append(str(e))
    return out


def test_loading_into_another_architecture_or_a_garbage_rank_state_is_a_checkpoint_error(root):
    ckpt = root / "step_0000003"
    arch, state = run_ranks(_load_errors, 1, timeout=240, args=(str(ckpt),))[0]
    assert arch.startswith(
        f"{ckpt}/model: the weights cannot be loaded into the model built from the current config"
    )
    assert "config.yaml" in arch and "\n" not in arch
    assert state.startswith(f"{ckpt}/rank_state/rank_00000.pt: unreadable training state")


def test_format_removed_from_meta_still_verifies_against_the_manifest(root):
    ckpt = root / "step_0000003"
    meta = json.loads((ckpt / "meta.json").read_text())
    del meta["format"]
    (ckpt / "meta.json").write_text(json.dumps(meta))
    assert verify_checkpoint(ckpt)[0].startswith("meta.json: ")


def _resume_lookup(rank, root):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        return str(find_resume_checkpoint(root, report=lambda _: None))
    except CheckpointError as e:
        return f"CheckpointError: {e}"


def test_every_rank_resumes_from_the_same_checkpoint_or_gets_the_same_error(root):
    _truncate("model/__0_0.distcp", 10)(root / "step_0000003")
    assert run_ranks(_resume_lookup, 2, timeout=120, args=(str(root),)) == [str(root / "step_0000002")] * 2
    for step in (1, 2):
        _delete("model/.metadata")(root / f"step_000000{step}")
    first, second = run_ranks(_resume_lookup, 2, timeout=120, args=(str(root),))
    assert first == second and first.startswith(f"CheckpointError: no intact checkpoint in {root}")


def test_a_checkpoint_to_load_is_verified_by_checksum_unless_told_sizes_only(root):
    ckpt = root / "step_0000003"
    _overwrite("model/__0_0.distcp", FINITE_4K)(ckpt)  # bytes changed in place: the sizes still agree
    assert verified_checkpoint(ckpt, checksums=False) == ckpt
    with pytest.raises(CheckpointError) as err:
        verified_checkpoint(ckpt)
    assert str(err.value).startswith(f"checkpoint {ckpt} is damaged: model/__0_0.distcp: checksum mismatch")


def _verified_on_ranks(rank, ckpt):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        return str(verified_checkpoint(ckpt))
    except CheckpointError as e:
        return f"CheckpointError: {e}"


def test_every_rank_gets_the_same_verification_answer(root):
    ckpt = root / "step_0000003"
    assert run_ranks(_verified_on_ranks, 2, timeout=120, args=(str(ckpt),)) == [str(ckpt)] * 2
    _overwrite("model/__0_0.distcp", NAN_4K)(ckpt)
    first, second = run_ranks(_verified_on_ranks, 2, timeout=120, args=(str(ckpt),))
    assert first == second and "model/__0_0.distcp: checksum mismatch" in first


# A teacher, or the initial weights, whose bytes were overwritten in place (same size): refused before
# it is loaded, in one line naming the file, exit 2.
_LOAD_AS = {
    "teacher": lambda ckpt: ["run", f"teachers=[{{name: t, checkpoint: {ckpt}}}]"],
    "init_checkpoint": lambda ckpt: ["sft", f"train.init_checkpoint={ckpt}"],
}


@pytest.mark.parametrize("role", list(_LOAD_AS))
def test_a_checkpoint_changed_in_place_is_refused_when_loaded(root, tmp_path, role):

    ckpt = root / "step_0000003"
    _overwrite("model/__0_0.distcp", FINITE_4K)(ckpt)
    out = tmp_path / "out"
    model = [f"model.{k}={v}" for k, v in SMALL.__dict__.items() if k in ("num_layers", "hidden_size",
             "num_attention_heads", "max_sequence_length")]  # fmt: skip
    proc = run_cli(*_LOAD_AS[role](ckpt), *model, "rollout.max_new_tokens=8", "data.domains=[reversal]",
                   "data.train_size=64", "data.eval_size=8", "train.steps=2", f"train.output_dir={out}",
                   "train.progress=false")  # fmt: skip
    line = one_error_line(proc)
    assert line.startswith("error: "), line
    assert f"checkpoint {ckpt} is damaged: model/__0_0.distcp: checksum mismatch (sha256 " in line
    assert ("teachers[0]: teacher 't'" in line) == (role == "teacher")
    assert not (out / "checkpoints").exists()


def test_the_demo_reuses_an_sft_only_when_its_final_checkpoint_is_intact(root, tmp_path):
    from opd_megatron.recipes.mopd_demo import Budget, expert_config, finished_sft, is_cached

    cfg = expert_config(str(tmp_path / "demo"), "reversal", Budget(expert_steps=3))
    shutil.copytree(root, Path(cfg.train.output_dir) / "checkpoints")
    final = Path(cfg.train.output_dir) / "checkpoints" / "step_0000003"
    assert finished_sft(cfg) == final and is_cached(cfg)
    _overwrite("model/__0_0.distcp", FINITE_4K)(final)  # the sizes still agree
    assert finished_sft(cfg) is None and not is_cached(cfg)  # step 2, the newest intact, is not the end
