"""``train.export_hf``: where an export may go (never over a source, the run or an unrelated directory),
atomic replacement of an earlier export of the run, and the export of a run resumed after its final
checkpoint when the export is missing or older than that checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from opd_megatron.config import ConfigError, RunConfig, TeacherConfig, TokenizerConfig, TrainConfig
from opd_megatron.models.hf_export import EXPORT_MARKER, check_export_target, export_step
from opd_megatron.models.hf_safetensors import HFWeights
from tests.hf_model_dirs import tiny_qwen3_dir
from tests.multirank import run_ranks

EXTRA = 24  # embedding rows beyond the tokenizer's ids


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return tiny_qwen3_dir(tmp_path_factory.mktemp("export") / "qwen3", seed=4, extra_rows=EXTRA)


def _cfg(root: Path, export: Path, init: Path | None = None, teacher: Path | None = None) -> RunConfig:
    teachers = [TeacherConfig(name="t", checkpoint=str(teacher))] if teacher else []
    train = TrainConfig(
        output_dir=str(root / "run"), export_hf=str(export), init_checkpoint=str(init) if init else None
    )
    return RunConfig(teachers=teachers, train=train, tokenizer=TokenizerConfig(kind="hf", path=str(root)))


def _marker(directory: Path, output_dir: Path, step: int = 2) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.safetensors").write_bytes(b"weights")
    record = {"output_dir": str(output_dir.resolve()), "step": step, "name": "run"}
    (directory / EXPORT_MARKER).write_text(json.dumps(record))
    return directory


@pytest.mark.parametrize(
    "where, message",
    [
        ("models/init", r"is or overlaps train\.init_checkpoint"),
        ("models/init/inside", r"is or overlaps train\.init_checkpoint"),
        ("models", r"is or overlaps train\.init_checkpoint"),  # a directory holding the init checkpoint
        ("teacher/out", r"is or overlaps teachers\[0\]\.checkpoint"),
        ("run", r"holds train\.output_dir"),
        ("unrelated", r"non-empty directory that is no export of this project"),
        ("other_export", r"holds the export of another run"),
        ("a_file", r"exists and is not a directory"),
    ],
)
def test_export_target_that_would_replace_something_else_is_refused(tmp_path, where, message):
    init, teacher = tmp_path / "models" / "init", tmp_path / "teacher"
    for d in (init, teacher):
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
    (tmp_path / "unrelated").mkdir()
    (tmp_path / "unrelated" / "notes.txt").write_text("mine")
    _marker(tmp_path / "other_export", tmp_path / "another_run")
    (tmp_path / "a_file").write_text("x")
    target = tmp_path / where
    with pytest.raises(ConfigError, match=r"^train\.export_hf: .*" + message):
        check_export_target(_cfg(tmp_path, target, init, teacher))


def test_export_target_that_may_be_written(tmp_path):
    init = tmp_path / "init"
    init.mkdir()
    check_export_target(_cfg(tmp_path, tmp_path / "absent", init))
    (tmp_path / "empty").mkdir()
    check_export_target(_cfg(tmp_path, tmp_path / "empty", init))
    own = _marker(tmp_path / "own", tmp_path / "run", step=3)  # an earlier export of this run
    check_export_target(_cfg(tmp_path, own, init))
    check_export_target(_cfg(tmp_path, tmp_path / "run" / "export", init))  # inside the run: fine
    assert export_step(own, tmp_path / "run") == 3 and export_step(own, tmp_path / "other") is None
    assert export_step(tmp_path / "empty", tmp_path / "run") is None


def test_cli_refuses_a_bad_export_target_in_one_line(hf_dir, tmp_path, capsys):
    from opd_megatron.cli import main

    code = main(["sft", f"train.init_checkpoint={hf_dir}", f"train.export_hf={hf_dir}/out"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("config error: train.export_hf: ") and "train.init_checkpoint" in err


def _sft_config(hf_dir: str, root: str):
    from opd_megatron.cli import _load

    return _load(
        None,
        [
            f"train.init_checkpoint={hf_dir}", f"train.output_dir={root}/run", f"train.export_hf={root}/export",
            "train.steps=2", "train.micro_batch_size=4", "train.eval_every=0", "train.eval_samples=2",
            "train.progress=false", "train.warmup_steps=1", "data.domains=[reversal]", "data.train_size=16",
            "data.eval_size=2", "model.max_sequence_length=64",
        ],
    )  # fmt: skip


def _runs(rank, hf_dir: str, root: str):
    """A finished run, then four resumes of it: export removed, export current, export stale, export
    over an earlier export holding a stray file."""
    from opd_megatron.train.sft import run_sft

    export, out = Path(root) / "export", {}

    def state():
        marker = json.loads((export / EXPORT_MARKER).read_text()) if export.is_dir() else None
        stamp = (export / "model.safetensors").stat().st_mtime_ns if export.is_dir() else None
        return marker, stamp, sorted(p.name for p in Path(root).iterdir())

    run_sft(_sft_config(hf_dir, root))
    out["first"] = state()
    shutil.rmtree(export)
    run_sft(_sft_config(hf_dir, root))
    out["missing"] = state()
    run_sft(_sft_config(hf_dir, root))
    out["current"] = state()
    marker = json.loads((export / EXPORT_MARKER).read_text())
    (export / EXPORT_MARKER).write_text(json.dumps({**marker, "step": 1}))
    (export / "stray.txt").write_text("left by an older export")
    run_sft(_sft_config(hf_dir, root))
    out["stale"] = state()
    out["stale_files"] = sorted(p.name for p in export.iterdir())
    return out


def test_finished_run_exports_when_the_export_is_missing_or_stale(hf_dir, tmp_path):
    out = run_ranks(_runs, 1, timeout=600, args=(str(hf_dir), str(tmp_path)))[0]
    run_dir = str((tmp_path / "run").resolve())
    marker, stamp, listing = out["first"]
    assert marker == {"output_dir": run_dir, "step": 2, "name": "run"}
    assert listing == ["export", "run"]
    # Removed: the resumed (finished) run writes it again from its final checkpoint.
    assert out["missing"][0] == marker and out["missing"][2] == ["export", "run"]
    # Current: left alone.
    assert out["current"][:2] == out["missing"][:2]
    # Stale: replaced as a whole (the stray file is gone), with no staging or old copy left beside it.
    assert out["stale"][0] == marker and out["stale"][1] != out["current"][1]
    assert out["stale"][2] == ["export", "run"]
    assert "stray.txt" not in out["stale_files"] and "config.json" in out["stale_files"]
    trained, source = HFWeights(tmp_path / "export"), HFWeights(hf_dir)
    assert sorted(trained.names()) == sorted(source.names())
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(trained.read(name), source.read(name))  # the trained weights, not the source's
    # The embedding: trained rows for the tokenizer's ids, the source's own rows beyond them.
    emb, src = trained.read("model.embed_tokens.weight"), source.read("model.embed_tokens.weight")
    assert emb.shape == src.shape
    assert torch.equal(emb[-EXTRA:], src[-EXTRA:]) and not torch.equal(emb[:-EXTRA], src[:-EXTRA])
