"""Bad configuration and data given to the CLI: each is a one-line error naming the field (or the file and
line), exit status 2, no traceback, and nothing trained. The HTTP service, the remote client and damaged
checkpoints have their own tables (tests/teachers/test_server_hardening.py, test_remote_answers.py,
tests/models/test_checkpoint_integrity.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opd_megatron.cli import main
from tests.cli_process import one_error_line, run_cli

# (override, the field path the message must name)
CONFIG_CASES = [
    ("train.lr=.inf", "train.lr"),
    ("train.lr=.nan", "train.lr"),
    ("train.lr=-1", "train.lr"),
    ("train.min_lr=.inf", "train.min_lr"),
    ("train.save_every=-1", "train.save_every"),
    ("train.eval_every=-1", "train.eval_every"),
    ("train.steps=0", "train.steps"),
    ("train.steps=abc", "train.steps"),
    ("train.micro_batch_size=0", "train.micro_batch_size"),
    ("train.grad_accumulation=0", "train.grad_accumulation"),
    ("train.warmup_steps=-1", "train.warmup_steps"),
    ("train.grad_clip=-1", "train.grad_clip"),
    ("train.keep_last=0", "train.keep_last"),
    ("train.lr_schedule=exp", "train.lr_schedule"),
    ("train.weight_decay=.inf", "train.weight_decay"),
    ("train.adam_beta2=.nan", "train.adam_beta2"),
    ("train.resume=maybe", "train.resume"),
    ("train.lrr=1", "train.lrr"),
    ("trian.lr=1", "trian"),
    ("model.num_layers=0", "model.num_layers"),
    ("model.hidden_size=130", "model.hidden_size"),
    ("model.num_query_groups=3", "model.num_query_groups"),
    ("model.params_dtype=fp64", "model.params_dtype"),
    ("model.transformer_impl=cuda", "model.transformer_impl"),
    ("model.fp8=e5m2", "model.fp8"),
    ("model.vocab_size=0", "model.vocab_size"),
    ("model.max_sequence_length=0", "model.max_sequence_length"),
    ("model.hidden_size=[1]", "model.hidden_size"),
    ("parallel.tensor_model_parallel_size=3", "parallel.tensor_model_parallel_size"),
    ("parallel.tensor_model_parallel_size=0", "parallel.tensor_model_parallel_size"),
    ("parallel.pipeline_model_parallel_size=3", "parallel.pipeline_model_parallel_size"),
    ("parallel.backend=mpi", "parallel.backend"),
    ("tokenizer.kind=bpe", "tokenizer.kind"),
    ("tokenizer.kind=sentencepiece", "tokenizer.path"),
    ("loss.divergence=kl", "loss.divergence"),
    ("loss.objective=ppo", "loss.objective"),
    ("loss.jsd_beta=2", "loss.jsd_beta"),
    ("loss.temperature=0", "loss.temperature"),
    ("loss.skew_alpha=1", "loss.skew_alpha"),
    ("loss.on_policy_lambda=1.5", "loss.on_policy_lambda"),
    ("loss.topk=0", "loss.topk"),
    ("loss.chunk_size=0", "loss.chunk_size"),
    ("loss.cross_kl=exact", "loss.cross_kl"),
    ("loss.uld_metric=l2", "loss.uld_metric"),
    ("loss.topk_tail=none", "loss.topk_tail"),
    ("loss.lambda_schedule=cosine", "loss.lambda_schedule"),
    ("rollout.max_new_tokens=0", "rollout.max_new_tokens"),
    ("rollout.max_new_tokens=500", "rollout.max_new_tokens"),
    ("rollout.top_p=0", "rollout.top_p"),
    ("rollout.temperature=-1", "rollout.temperature"),
    ("rollout.samples_per_prompt=3", "rollout.samples_per_prompt"),
    ("data.domains=[maths]", "data.domains[0]"),
    ("data.difficulty=99", "data.difficulty"),
    ("data.train_size=0", "data.train_size"),
    ("mopd.routing=vote", "mopd.routing"),
    ("mopd.max_teacher_failures=0", "mopd.max_teacher_failures"),
    ("mopd.mixture_temperature=0", "mopd.mixture_temperature"),
    ("mopd.confidence=margin", "mopd.confidence"),
    ("launch.executor=k8s", "launch.executor"),
    ("launch.nodes=0", "launch.nodes"),
    # Every float field is finite; the obvious ranges hold.
    ("model.norm_epsilon=.nan", "model.norm_epsilon"),
    ("model.norm_epsilon=0", "model.norm_epsilon"),
    ("model.init_method_std=.nan", "model.init_method_std"),
    ("model.init_method_std=-0.02", "model.init_method_std"),
    ("model.rotary_base=.inf", "model.rotary_base"),
    ("model.rotary_base=0", "model.rotary_base"),
    ("model.rope_scaling_factor=.inf", "model.rope_scaling_factor"),
    ("model.rope_low_freq_factor=.nan", "model.rope_low_freq_factor"),
    ("model.rope_high_freq_factor=.inf", "model.rope_high_freq_factor"),
    ("model.moe_aux_loss_coeff=.nan", "model.moe_aux_loss_coeff"),
    ("loss.temperature=.inf", "loss.temperature"),
    ("loss.temperature=.nan", "loss.temperature"),
    ("loss.rlsd_eps=.nan", "loss.rlsd_eps"),
    ("loss.rlsd_eps=-0.1", "loss.rlsd_eps"),
    ("loss.gopd_lambda=.inf", "loss.gopd_lambda"),
    ("loss.opsd_tau=.inf", "loss.opsd_tau"),
    ("loss.cross_kl_weight=.inf", "loss.cross_kl_weight"),
    ("loss.uld_weight=.nan", "loss.uld_weight"),
    ("rollout.temperature=.nan", "rollout.temperature"),
    ("rollout.temperature=.inf", "rollout.temperature"),
    ("rollout.vllm_kv_cache_mb=.inf", "rollout.vllm_kv_cache_mb"),
    ("rollout.tis_cap=.inf", "rollout.tis_cap"),
    ("mopd.mixture_temperature=.inf", "mopd.mixture_temperature"),
    ("mopd.pass_rates.addition.t=.nan", "mopd.pass_rates.addition.t"),
    ("train.adam_beta1=1", "train.adam_beta1"),
    ("train.weight_decay=-0.1", "train.weight_decay"),
    ("train.grad_clip=.inf", "train.grad_clip"),
]

# (teacher entry, extra overrides, the field path the message must name) for `opd-megatron run`
TEACHER_CASES = [
    ({"name": "t", "placement": "cloud", "checkpoint": "x"}, [], "teachers[0].placement"),
    ({"name": "t", "placement": "remote"}, [], "teachers[0].url"),
    ({"name": "t", "placement": "colocated"}, [], "teachers[0].checkpoint"),
    ({"name": "", "checkpoint": "x"}, [], "teachers[0].name"),
    ({"name": "t", "checkpoint": "x", "weight": -1}, [], "teachers[0].weight"),
    (
        {"name": "t", "placement": "remote", "url": "http://127.0.0.1:9", "timeout_s": 0},
        [],
        "teachers[0].timeout_s",
    ),
    (
        {"name": "t", "placement": "remote", "url": "http://127.0.0.1:9", "retries": -1},
        [],
        "teachers[0].retries",
    ),
    ({"name": "t", "placement": "self", "ema_rate": 1.0}, [], "teachers[0].ema_rate"),
    ({"name": "t", "checkpoint": "x", "dtype": "fp16"}, [], "teachers[0].dtype"),
    ({"name": "t", "placement": "self", "self_mode": "swa"}, [], "teachers[0].self_mode"),
    ({"name": "t", "checkpoint": "x", "domains": "reversal"}, [], "teachers[0].domains"),
    ({"name": "t", "checkpoint": "x"}, ["mopd.default_teacher=nobody"], "mopd.default_teacher"),
    ({"name": "t", "checkpoint": "x"}, ["teachers.0.weight=.nan"], "teachers[0].weight"),
    ({"name": "t", "checkpoint": "x"}, ["teachers.0.vllm_kv_cache_mb=.inf"], "teachers[0].vllm_kv_cache_mb"),
    (
        {"name": "t", "placement": "remote", "url": "http://127.0.0.1:9"},
        ["teachers.0.timeout_s=.inf"],
        "teachers[0].timeout_s",
    ),
    (
        {"name": "t", "placement": "remote", "url": "http://127.0.0.1:9"},
        ["loss.objective=tinker"],
        "loss.objective",
    ),
    (
        {
            "name": "t",
            "placement": "remote",
            "url": "http://127.0.0.1:9",
            "token_env": "OPD_NO_SUCH_VARIABLE",
        },
        [],
        "teachers[0].token_env",
    ),
    ({"name": "t", "checkpoint": "/nonexistent/teacher"}, [], "/nonexistent/teacher"),
]
MISSING_FILES = {"/nonexistent/teacher"}


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("override,field", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_is_one_line_naming_the_field(override, field, tmp_path, capsys):
    code, err = _cli(["sft", override, f"train.output_dir={tmp_path}/out"], capsys)
    assert code == 2, err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("config error: "), err  # a ConfigError, reported as one
    assert field in err, err
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


@pytest.mark.parametrize(
    "teacher,extra,field", TEACHER_CASES, ids=[c[2] + str(i) for i, c in enumerate(TEACHER_CASES)]
)
def test_bad_teacher_config_is_one_line_naming_the_field(
    teacher, extra, field, tmp_path, capsys, monkeypatch
):
    # A missing checkpoint is a CheckpointError ("error:"); the others are configuration errors.
    prefix = "error: " if field in MISSING_FILES else "config error: "
    monkeypatch.delenv("OPD_NO_SUCH_VARIABLE", raising=False)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(json.dumps({"teachers": [teacher], "train": {"output_dir": str(tmp_path / "out")}}))
    code, err = _cli(["run", str(cfg), *extra], capsys)
    assert code == 2, err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith(prefix), err
    assert field in err, err
    assert not (tmp_path / "out").exists()


def test_a_config_file_that_is_not_there_or_not_a_mapping(tmp_path, capsys):
    code, err = _cli(["sft", str(tmp_path / "missing.yaml")], capsys)
    assert code == 2 and "config file not found" in err and "Traceback" not in err
    assert err.startswith("config error: ") and err.count("\n") == 1, err
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    code, err = _cli(["sft", str(bad)], capsys)
    assert code == 2 and "top level must be a mapping" in err
    assert err.startswith("config error: ") and err.count("\n") == 1, err


# Bad data rows go through a real process (the data is read after the process group is up): each is
# named by file and line before anything trains.
DATA_CASES = [
    ("{not json", "invalid JSON"),
    ('{"domain": "reversal", "reference": "ba"}', "prompt"),
    ('{"prompt": 5, "domain": "reversal", "reference": "ba"}', "prompt"),
    ('{"messages": [{"role": "wizard", "content": "hi"}], "domain": "reversal", "reference": "x"}', "wizard"),
    ('{"messages": [], "domain": "reversal", "reference": "x"}', "messages"),
    ('{"messages": [{"role": "user", "content": 3}], "domain": "reversal", "reference": "x"}', "content"),
    ('{"prompt": "reverse ab=", "domain": "reversal", "reference": "' + "x" * 300 + '"}', "max_len"),
]


@pytest.mark.parametrize("row,needle", DATA_CASES, ids=[c[1] + str(i) for i, c in enumerate(DATA_CASES)])
def test_bad_data_row_names_file_and_line_and_trains_nothing(row, needle, tmp_path):
    path = tmp_path / "rows.jsonl"
    good = '{"prompt": "reverse ab=", "domain": "reversal", "reference": "ba"}'
    path.write_text("\n".join([good, good, row]) + "\n")
    out = tmp_path / "out"
    proc = run_cli("sft", f"data.train_path={path}", "data.domains=[]", "train.steps=2",
                   f"train.output_dir={out}", "train.progress=false")  # fmt: skip
    # A data error (DataError), not a configuration error: the CLI's "error:" prefix, on one line.
    line = one_error_line(proc)
    assert line.startswith("error: "), proc.stderr
    assert f"{path}:3" in line and needle in line, (row, proc.stderr)
    assert not Path(out, "checkpoints").exists()


# A held-out prompt longer than the context leaves for the evaluation's completion: named by file and line
# at start-up, for SFT and for OPD alike (the OPD run stops before its teacher is even loaded).
_LONG_EVAL_RUNS = {
    "sft": ["sft"],
    "run": ["run", "teachers=[{name: t, checkpoint: /nonexistent/teacher}]", "rollout.max_new_tokens=8"],
}


@pytest.mark.parametrize("command", list(_LONG_EVAL_RUNS))
def test_an_eval_prompt_longer_than_the_context_is_named_before_training(command, tmp_path):
    train, held_out = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("".join(f'{{"prompt": "reverse {w}=", "domain": "reversal", "reference": "{w[::-1]}"}}\n'
                             for w in ("ab", "abc", "bcd")))  # fmt: skip
    long_prompt = "reverse " + "x" * 60 + "="  # 70 tokens with BOS, in a 32-token context
    held_out.write_text(
        '{"prompt": "reverse cd=", "domain": "reversal", "reference": "dc"}\n'
        f'{{"prompt": "{long_prompt}", "domain": "reversal", "reference": "x"}}\n'
    )
    out = tmp_path / "out"
    proc = run_cli(*_LONG_EVAL_RUNS[command], f"data.train_path={train}", f"data.eval_path={held_out}",
                   "data.domains=[]", "model.max_sequence_length=32", "train.steps=2", "train.micro_batch_size=2",
                   f"train.output_dir={out}", "train.progress=false")  # fmt: skip
    line = one_error_line(proc)
    assert line.startswith(f"error: {held_out}:2: the prompt is 70 tokens, longer than"), proc.stderr
    assert "model.max_sequence_length=32" in line
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
