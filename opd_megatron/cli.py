"""``opd-megatron`` command line. The only module (with ``launch``) that reads argv or the environment.

Every subcommand takes an optional YAML config and dotted overrides (``train.lr=3e-4``). Configuration
errors are printed without a traceback and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from opd_megatron.config import ConfigError, load_config

EXIT_CONFIG = 2


def _quiet_warnings() -> None:
    # Megatron-core warns about optional CUDA packages (apex) that a CPU run never needs.
    for pattern in ("Apex is not installed", "full scope is deprecated", ".*cuda_graph_scope.*"):
        warnings.filterwarnings("ignore", message=pattern)
    # Megatron-core's dist_checkpointing calls torch.distributed.checkpoint APIs that torch deprecates.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"megatron\..*")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\.checkpoint.*")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.distributed\.checkpoint.*")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML run config (defaults when omitted)")
    p.add_argument(
        "overrides",
        nargs="*",
        help="dotted overrides, e.g. train.lr=3e-4 parallel.tensor_model_parallel_size=2",
    )


def _split_config(args) -> tuple[str | None, list[str]]:
    # argparse cannot tell "config.yaml" from "train.lr=1" positionally; an "=" marks an override.
    cfg, overrides = args.config, list(args.overrides)
    if cfg is not None and "=" in cfg:
        cfg, overrides = None, [cfg, *overrides]
    return cfg, overrides


def _preflight(cfg) -> None:
    """Checks that need no model: fail in a second, before Megatron-core is imported and ranks start."""
    from opd_megatron.models.checkpoint import resolve_checkpoint
    from opd_megatron.models.hf_dir import is_hf_dir
    from opd_megatron.models.hf_export import check_export_target
    from opd_megatron.models.specs import resolve_impl

    resolve_impl(cfg.model)
    check_export_target(cfg)
    if cfg.train.init_checkpoint and not is_hf_dir(cfg.train.init_checkpoint):
        resolve_checkpoint(cfg.train.init_checkpoint)
    for i, t in enumerate(cfg.teachers):
        if t.checkpoint and is_hf_dir(t.checkpoint) and t.placement != "vllm":
            _check_hf_teacher(t.checkpoint, f"teachers[{i}].checkpoint")


def _check_hf_teacher(path: str, where: str) -> None:
    """An HF teacher directory's config.json and tokenizer files, read before any process starts (its
    weights are checked when it is converted)."""
    from opd_megatron.models.hf_dir import model_config_from_hf
    from opd_megatron.models.hf_safetensors import ConversionError

    try:
        model_config_from_hf(path)
    except ConversionError as e:
        raise ConfigError(where, str(e)) from None


def _load(path, overrides):
    """The run config, its ``model``/``tokenizer`` completed from a Hugging Face init checkpoint."""
    from opd_megatron.models.hf_dir import apply_hf_model_config

    return load_config(path, overrides, prepare=apply_hf_model_config)


def cmd_sft(args) -> int:
    path, overrides = _split_config(args)
    cfg = _load(path, overrides)
    _preflight(cfg)
    from opd_megatron.train.sft import run_sft

    result = run_sft(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        from opd_megatron.train.report import print_table

        print_table(
            f"SFT {cfg.name}: held-out exact match",
            ["domain", "before", "after"],
            [
                [d, f"{result.eval_before.get(d, float('nan')):.3f}", f"{v:.3f}"]
                for d, v in result.eval_after.items()
            ],
        )
        print(_summary_line(result))
    return 0


def _summary_line(result) -> str:
    """The last line of a run: its checkpoint, wall time and the steps it skipped, by reason."""
    reasons = ", ".join(f"{k} {v}" for k, v in result.skipped.items())
    return f"checkpoint: {result.checkpoint}  ({result.wall_s:.0f}s, {result.skipped_steps} skipped steps" + (
        f": {reasons})" if reasons else ")"
    )


def cmd_run(args) -> int:
    path, overrides = _split_config(args)
    if path is None and not any(o.startswith("teachers") for o in overrides):
        from opd_megatron.recipes.mopd_demo import run_mopd_demo

        return run_mopd_demo(None, overrides, seeds=args.seeds)
    cfg = _load(path, overrides)
    _preflight(cfg)
    from opd_megatron.train.opd import run_opd

    result = run_opd(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        from opd_megatron.train.report import print_table

        rows = [
            [d, f"{result.eval_before.get(d, float('nan')):.3f}", f"{v:.3f}"]
            for d, v in result.eval_after.items()
        ]
        rows.append(["reverse KL to teacher", f"{result.kl_before:.4f}", f"{result.kl_after:.4f}"])
        print_table(f"OPD {cfg.name}: held-out exact match", ["domain", "before", "after"], rows)
        print(_summary_line(result))
    return 0


CORE_COMMANDS = ("sft", "run")


def build_parser(optional: bool = True) -> argparse.ArgumentParser:
    """The parser; ``optional=False`` leaves out the subcommands whose modules import torch at once, so
    ``sft`` and ``run`` (the demo) print their first lines without waiting for those imports."""
    parser = argparse.ArgumentParser(prog="opd-megatron", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("sft", help="supervised fine-tuning (the specialise stage)")
    _add_config_args(p)
    p.set_defaults(func=cmd_sft)
    p = sub.add_parser(
        "run",
        help="on-policy distillation; without a config, the built-in teacher -> student job of `make demo`",
    )
    _add_config_args(p)
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="the built-in job only: run the whole pipeline for this many seeds (table: mean +- std)",
    )
    p.set_defaults(func=cmd_run)
    if not optional:
        return parser
    try:
        from opd_megatron.launch.cli import add_launch_parser

        add_launch_parser(sub)
    except ImportError:
        pass
    try:
        from opd_megatron.models.hf_convert import add_convert_parser

        add_convert_parser(sub)
    except ImportError:
        pass
    try:
        from opd_megatron.teachers.cli import add_serve_parser

        add_serve_parser(sub)
    except ImportError:
        pass
    try:
        from opd_megatron.tokenization.cli import add_align_parser

        add_align_parser(sub)
    except ImportError:
        pass
    return parser


def main(argv: list[str] | None = None) -> int:
    _quiet_warnings()
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(optional=not argv or argv[0] not in CORE_COMMANDS)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:  # outside the training loop (which saves and exits on SIGINT itself)
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # user-facing data/checkpoint errors: no traceback, a clear message
        from opd_megatron.data.jsonl import DataError
        from opd_megatron.models.checkpoint import CheckpointError
        from opd_megatron.rollout.vllm_host import EngineStartError
        from opd_megatron.teachers.base import TeacherError
        from opd_megatron.tokenization.base import TokenizerError

        if isinstance(e, DataError | CheckpointError | TokenizerError | EngineStartError):
            print(f"error: {e}", file=sys.stderr)
            return EXIT_CONFIG
        if isinstance(e, TeacherError):  # the message names the teacher; checkpoints on disk are intact
            print(f"teacher error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
