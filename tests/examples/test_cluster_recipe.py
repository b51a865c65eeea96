"""The README's cluster recipe (``examples/real_models/qwen3_8b_to_1p7b.yaml``) as written, with tiny Hugging
Face directories built here in place of its model paths: ``run`` loads and validates it (model and
tokenizer from the student's directory), and ``launch --dryrun`` submits it, shipping a config that the
nodes' ``run`` loads to the same RunConfig."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from opd_megatron.cli import _load, _preflight, main
from opd_megatron.config import to_dict, validate_opd
from tests.hf_model_dirs import tiny_qwen3_dir

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "examples" / "real_models" / "qwen3_8b_to_1p7b.yaml"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("recipe")
    tiny_qwen3_dir(root / "student", seed=1)
    tiny_qwen3_dir(root / "teacher", seed=2, layers=4)
    return root


def _overrides(root: Path) -> list[str]:
    """The recipe's paths, and nothing else, replaced."""
    return [
        f"teachers.0.checkpoint={root / 'teacher'}",
        f"train.init_checkpoint={root / 'student'}",
        f"train.export_hf={root / 'export'}",
        f"train.output_dir={root / 'out'}",
        f"data.train_path={root / 'prompts.jsonl'}",
        f"data.eval_path={root / 'eval.jsonl'}",
        f"launch.job_dir={root / 'jobs'}",
    ]


def test_the_readme_shows_the_recipe_file():
    readme = (ROOT / "README.md").read_text()
    assert "examples/real_models/qwen3_8b_to_1p7b.yaml" in readme
    body = RECIPE.read_text().split("\nname: ", 1)[1]  # the file without its leading comment
    assert f"```yaml\nname: {body}```" in readme


def test_run_loads_and_validates_the_recipe(dirs):
    cfg = _load(str(RECIPE), _overrides(dirs))
    _preflight(cfg)
    validate_opd(cfg)
    # Architecture and tokenizer from the student's directory; the recipe's own run-time fields kept.
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.qk_layernorm) == (2, 32, True)
    assert (cfg.model.params_dtype, cfg.model.max_sequence_length) == ("bf16", 8192)
    assert cfg.tokenizer.kind == "hf" and cfg.tokenizer.path == str((dirs / "student").resolve())
    assert cfg.tokenizer.chat_template == "model"
    assert cfg.tokenizer.template_kwargs == {"enable_thinking": False}
    assert 0 <= cfg.train.min_lr <= cfg.train.lr == 1e-6
    assert (cfg.train.optimizer_impl, cfg.train.use_distributed_optimizer) == ("megatron", True)
    assert cfg.teachers[0].checkpoint == str(dirs / "teacher") and cfg.parallel.tp == 2
    raw = yaml.safe_load(RECIPE.read_text())
    assert cfg.rollout.engine == raw["rollout"]["engine"] == "vllm"


def _heredoc_config(script: str) -> str:
    return script.split("<<'OPD_RUN_CONFIG_YAML'\n", 1)[1].split("\nOPD_RUN_CONFIG_YAML\n", 1)[0]


def test_launch_dryrun_submits_the_recipe(dirs, tmp_path, capsys, monkeypatch):
    import os
    import sys

    with open(os.devnull) as devnull:  # nemo-run's shell commands read stdin; pytest's capture forbids it
        monkeypatch.setattr(sys, "stdin", devnull)
        code = main(["launch", str(RECIPE), *_overrides(dirs), "--command", "run", "--dryrun"])
    out, err = capsys.readouterr()
    assert code == 0, err
    flags = dict(re.findall(r"#SBATCH --([\w-]+)=(\S+)", out))
    assert (flags["nodes"], flags["gpus-per-node"], flags["partition"]) == ("2", "8", "batch")
    assert "--nnodes=2 --nproc-per-node=8" in out and '-m opd_megatron.cli run "$cfg"' in out
    shipped = tmp_path / "shipped.yaml"
    shipped.write_text(_heredoc_config(out))
    # What each node's `run` reads: the same config, re-checked against the HF directory.
    assert to_dict(_load(str(shipped), [])) == to_dict(_load(str(RECIPE), _overrides(dirs)))


def test_launch_reports_a_bad_recipe_field_in_one_line(dirs, capsys):
    code = main(["launch", str(RECIPE), *_overrides(dirs), "model.num_layers=3", "--dryrun"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "model.num_layers: given 3 but the HF config says 2" in err
