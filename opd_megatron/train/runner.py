"""The run skeleton shared by SFT and OPD: resume, rank state, metrics, preemption, eval/save cadence.

A job subclasses :class:`TrainingRun` and supplies its model, optimizer and data cursor (set in its
constructor) and three methods: ``train_step(step) -> record``, ``evaluate() -> record`` and
``describe(start) -> str``. Everything a checkpoint holds is written here, in one place:

- the model's weights (Megatron distributed checkpoint, reshardable), plus ``extra_models()``;
- this rank's state (:meth:`TrainingRun.rank_state`): torch RNG, data position, skip counters, and the
  optimizer of ``train.optimizer_impl: torch``;
- the optimizer of ``train.optimizer_impl: megatron``, as a sharded state dict next to the weights
  (``optimizer/``), so such a run resumes at another TP/PP/DP layout;
- the run config and the tokenizer.

Resume restores exactly that, so a resumed run reproduces the uninterrupted one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from opd_megatron.config import RunConfig, save_config
from opd_megatron.distributed import ParallelGroups
from opd_megatron.models.checkpoint import (
    check_run_identity,
    find_resume_checkpoint,
    load_model_weights,
    load_rank_state,
    read_meta,
    save_checkpoint,
)
from opd_megatron.models.hf_export import check_export_target, export_hf, export_step
from opd_megatron.train.batch import DataCursor
from opd_megatron.train.hf_sources import materialise_sources
from opd_megatron.train.metrics import MetricsLogger, Progress, logged_record
from opd_megatron.train.preemption import PreemptionHandler


@dataclass
class RunSummary:
    """What a finished run reports: the first and last evaluation records, the final checkpoint."""

    steps: int
    first_eval: dict
    last_eval: dict
    checkpoint: Path
    wall_s: float
    history: list[dict] = field(default_factory=list)


class TrainingRun:
    """Owns the cadence of one training job; subclasses own what a step and an evaluation are."""

    kind: str = "run"
    """The job kind (``sft``, ``opd``): progress label, and recorded with checkpoints."""
    model: torch.nn.Module
    optimizer: object
    """A :mod:`~opd_megatron.train.optim` optimizer (torch or Megatron implementation)."""
    cursor: DataCursor
    tokenizer: object

    def __init__(self, cfg: RunConfig, groups: ParallelGroups):
        check_export_target(cfg)  # before anything runs: an export must never replace a source
        # Hugging Face directories given as checkpoints are converted (cached next to the run) first.
        cfg, self.hf_init = materialise_sources(cfg, groups)
        self.cfg, self.tc, self.groups = cfg, cfg.train, groups
        self.out_dir = Path(cfg.train.output_dir)
        self.skipped: dict[str, int] = {}
        """Steps skipped, by reason (saved with the rank state, reported at the end)."""

    # ------------------------------------------------------------------ what subclasses supply
    def train_step(self, step: int) -> dict:
        raise NotImplementedError

    def evaluate(self) -> dict:
        raise NotImplementedError

    def describe(self, start: int) -> str:
        raise NotImplementedError

    def progress_info(self, rec: dict) -> str:
        return f"loss {rec['loss']:.4f}" if "loss" in rec else rec.get("reason", "")

    def extra_models(self) -> dict | None:
        """Further models saved with the weights (e.g. a self-distillation teacher), by sub-directory."""
        return None

    def on_resume(self, ckpt: Path) -> None:
        """Restore what :meth:`extra_models` saved."""

    # ------------------------------------------------------------------ checkpoints
    def rank_state(self) -> dict:
        state = {
            "torch_rng": torch.get_rng_state(),
            "data": self.cursor.state(),
            "skipped": dict(self.skipped),
        }
        if not self.optimizer.sharded:  # a sharded optimizer is saved with the weights instead
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def load_rank_state(self, state: dict) -> None:
        if not self.optimizer.sharded:
            self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        self.cursor = DataCursor(self.cursor.n, self.cursor.seed, **state["data"])
        self.skipped.update(state.get("skipped", {}))

    def save(self, step: int) -> Path:
        return save_checkpoint(
            self.out_dir / "checkpoints",
            step,
            self.model,
            self.groups,
            config=self.cfg,
            tokenizer=self.tokenizer,
            rank_state=self.rank_state(),
            keep_last=self.tc.keep_last,
            extra_models=self.checkpointed_modules(),
            job=self.kind,
        )

    def checkpointed_modules(self) -> dict | None:
        """What goes to the distributed checkpoint besides the model: extra models and, when its state
        is sharded (Megatron optimizer), the optimizer (``optimizer/``), reshardable like the weights."""
        extra = dict(self.extra_models() or {})
        if self.optimizer.sharded:
            extra["optimizer"] = self.optimizer
        return extra or None

    def resume(self) -> int:
        """Load the newest intact checkpoint of this run's output directory (when ``train.resume``;
        damaged newer ones are reported and skipped); returns the step to continue from (0 for a fresh
        start). A checkpoint of another job kind, architecture, tokenizer or objective is an error unless
        ``train.resume: force``."""
        self.resumed_from = None
        if not self.tc.resume:
            return 0
        ckpt = find_resume_checkpoint(self.out_dir / "checkpoints")
        if ckpt is None:
            return 0
        check_run_identity(ckpt, self.cfg, self.kind, force=self.tc.resume == "force")
        load_model_weights(ckpt, self.model)
        self.on_resume(ckpt)
        if self.optimizer.sharded:
            self.optimizer.load_sharded(str(ckpt / "optimizer"))
        # With the optimizer in the distributed checkpoint, what remains per rank (RNG, data position,
        # counters) is the same on every rank, so a run may resume at another layout.
        self.load_rank_state(load_rank_state(ckpt, self.groups, any_layout=self.optimizer.sharded))
        self.resumed_from = ckpt
        return read_meta(ckpt)["step"]

    def logged_eval(self, step: int) -> dict:
        """The evaluation record this run's ``metrics.jsonl`` holds for ``step`` (``{}`` if none)."""
        return logged_record(self.out_dir / "metrics.jsonl", "eval", step)

    def export(self, out: Path, step: int) -> Path:
        """Write the model of ``step`` as a Hugging Face directory (collective), marked as this run's
        export: the tokenizer files come from the Hugging Face directory the run started from, else from
        the run's ``hf`` tokenizer."""
        tok = Path(self.hf_init.checkpoint) / "hf" if self.hf_init is not None else self.tokenizer
        marker = {"output_dir": str(self.out_dir.resolve()), "step": step, "name": self.cfg.name}
        beyond = self.hf_init.beyond_tokenizer if self.hf_init is not None else None
        path = export_hf(
            self.model, self.cfg.model, tok, out, self.groups, chat_template=self.cfg.tokenizer.chat_template,
            marker=marker, beyond_tokenizer=beyond,
        )  # fmt: skip
        if self.groups.is_main:
            print(f"exported {self.kind} {self.cfg.name} as a Hugging Face model: {path}", flush=True)
        return path

    # ------------------------------------------------------------------ the run
    def run(self) -> RunSummary:
        t_start = time.monotonic()
        g, tc = self.groups, self.tc
        start = self.resume()
        if g.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.out_dir / "config.yaml")
            print(self.describe(start), flush=True)
        if start >= tc.steps:  # already finished: nothing to train, log or save again
            if g.is_main:
                print(
                    f"{self.kind} {self.cfg.name}: finished at step {start}; {self.resumed_from}", flush=True
                )
            # An export the finished run did not write (asked for later, removed, or from before its
            # final checkpoint) is written from the final checkpoint's weights.
            if tc.export_hf and export_step(tc.export_hf, self.out_dir) != start:
                self.export(Path(tc.export_hf), start)
            # Its results are the evaluations it logged (evaluated again only when its log lacks them).
            last = self.logged_eval(start) or self.evaluate()
            return RunSummary(start, self.logged_eval(0), last, self.resumed_from, time.monotonic() - t_start)
        # One handler per run, uninstalled when it ends: a request it could not act on (it came during
        # the last step, the final evaluation or save) stops the next run of this process at once.
        preempt = PreemptionHandler.install()
        try:
            if preempt.sync(None):
                preempt.finish(None)
            # On resume the log keeps the records up to the checkpoint (later ones move to a side file).
            metrics = MetricsLogger(self.out_dir, enabled=g.is_main, resume_step=start if start else None)
            first, history = self.train_loop(start, metrics, preempt)
            last = self.evaluate()
            metrics.log("eval", tc.steps, last)
            ckpt = self.save(tc.steps)
            if tc.export_hf:
                self.export(Path(tc.export_hf), tc.steps)
            metrics.close()
        finally:
            preempt.uninstall(keep_request=True)
        return RunSummary(tc.steps, first, last, ckpt, time.monotonic() - t_start, history)

    def train_loop(self, start: int, metrics: MetricsLogger, preempt: PreemptionHandler) -> tuple[dict, list]:
        """Steps ``start + 1 .. train.steps`` with their evaluations and saves (a stop request saves and
        exits); returns the evaluation before training (on resume: the one this run logged at its fresh
        start, ``{}`` when the log lacks it) and the steps' records."""
        tc = self.tc
        if start == 0:
            first = self.evaluate()
            metrics.log("eval", 0, first)
        else:
            first = self.logged_eval(0)
        progress = Progress(
            tc.steps, f"{self.kind} {self.cfg.name}", enabled=self.groups.is_main and tc.progress, start=start,
            log_every=tc.log_every,
        )  # fmt: skip
        history = []
        for step in range(start, tc.steps):
            rec = self.train_step(step)
            metrics.log("train", step + 1, rec)
            history.append(rec)
            progress.update(step + 1, self.progress_info(rec))
            done = step + 1
            if tc.eval_every and done % tc.eval_every == 0 and done < tc.steps:
                metrics.log("eval", done, self.evaluate())
            if tc.save_every and done % tc.save_every == 0 and done < tc.steps:
                self.save(done)
            if preempt.sync(None) and done < tc.steps:
                progress.close()
                ckpt = self.save(done)
                metrics.log("preempted", done, {"checkpoint": str(ckpt)})
                metrics.close()
                preempt.finish(ckpt)
        progress.close()
        return first, history


def domain_values(record: dict, prefix: str) -> dict[str, float]:
    """``{domain: value}`` of the ``prefix/<domain>`` entries of an evaluation record."""
    return {k.split("/", 1)[1]: v for k, v in record.items() if k.startswith(prefix + "/")}
