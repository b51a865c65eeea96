"""One OPD training step, end to end: this project's ``OPDTrainer`` against TRL's ``GKDTrainer``.

    python tools/bench/bench_opd_step.py [--cases compute,small,small_offpolicy] [--rounds 3] \\
        [--warmup 2] [--steps 5] [--threads 2] [--out bench_results/opd_step.json] [--markdown FILE]

What runs. Each case is one model size and one GKD lambda:

* ``compute``: vocabulary 32768, teacher 8 layers / hidden 768, student 6 layers / hidden 384, 128 new
  tokens, on-policy (lambda 1);
* ``small``: vocabulary 2048, teacher 4 layers / hidden 256 (3.7M parameters), student 2 layers /
  hidden 128 (0.66M), 32 new tokens, on-policy;
* ``small_offpolicy``: the small size with lambda 0 (the dataset's completions, nothing sampled).

Both sides get the same models and the same data. Teacher and student are random-init Llama-shaped
models (RMSNorm, SwiGLU, RoPE, tied embeddings, head size 64, one key/value head per query head, fp32)
built once by :func:`~opd_megatron.models.gpt.build_gpt_model`, saved as checkpoints of this project and
exported to Hugging Face safetensors, so TRL loads the very same weights. The tokenizer is a byte-level
BPE of exactly the case's vocabulary, trained here on synthetic pseudo-word text; prompts (16-48
tokens) and reference completions are made of that text. Every step takes 8 prompts, the same 8 on both
sides (TRL reads the rows sequentially in the order this project's data cursor draws them). Sampling is
at temperature 1 without top-k / top-p filtering; the loss is the generalised JSD with beta 0.5; the
optimizer is each side's own AdamW (lr 1e-5 constant, weight decay 0.01, betas 0.9 / 0.98, gradient
clipping at 1.0); one micro-batch of 8, no gradient accumulation.

* Ours: an :class:`~opd_megatron.train.opd.OPDTrainer` from a ``RunConfig`` with the teacher
  co-located (its checkpoint) and the student starting from its checkpoint; ``trainer.train_step(step)``
  per step. Phases are the record's ``time_rollout``, ``time_score`` and ``time_update``.
* TRL: ``GKDTrainer`` (``lmbda`` 1 or 0, ``beta`` 0.5, ``temperature`` 1.0, ``max_new_tokens`` as the
  case, fp32 on CPU, gradient checkpointing off: TRL's default turns it on, which also disables the KV
  cache of GKD's generation) driven by its own ``train()`` loop. Phases are measured from outside: rollout is
  the time in ``generate_on_policy_outputs``, teacher the time in the teacher model's forward.

Token accounting, the same on both sides: the generated tokens actually produced (up to and including
an EOS; padding after it is not counted) for on-policy steps; for off-policy steps the dataset
completion tokens the loss is taken on (EOS included). Throughput is those tokens per second of step
wall time. A step's wall time on both sides covers everything between the end of the previous step
and the end of this one (batch preparation, rollout, teacher, loss, backward, clipping, optimizer);
"loss+update" is the step wall time minus the rollout and teacher phases, on both sides.

Method. The two sides run in two separate worker processes (spawned, ``--threads`` intra-op threads
each, the same environment); they are started once per case and then alternate: in each of
``--rounds`` rounds each side runs ``--warmup`` untimed steps and then ``--steps`` timed steps while
the other side waits idle, and the side that goes first alternates between rounds. A round's ratio is
ours / TRL of tokens per second summed over that round's timed steps (the pairs measured nearest in
time); the table reports medians and ranges over rounds and over single steps, and the load average of
the machine before every round. The process CPU time (all threads) of each step is recorded too: on a
shared machine the wall-clock ratio includes waiting for a core, the CPU-time ratio does not.
Results go to a table on stdout and to the JSON file given by ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

EOS, PAD = "<|endoftext|>", "<|pad|>"


@dataclass(frozen=True)
class Case:
    name: str
    vocab: int
    teacher: tuple[int, int]
    """(layers, hidden) of the teacher."""
    student: tuple[int, int]
    new_tokens: int
    on_policy_lambda: float
    prompt_tokens: tuple[int, int] = (16, 48)
    """Prompt lengths in tokens (uniform, inclusive)."""


CASES = {
    "compute": Case("compute", 32768, (8, 768), (6, 384), 128, 1.0),
    "small": Case("small", 2048, (4, 256), (2, 128), 32, 1.0),
    "small_offpolicy": Case("small_offpolicy", 2048, (4, 256), (2, 128), 32, 0.0),
    # Development only: checks the plumbing in seconds; its numbers mean nothing.
    "tiny": Case("tiny", 512, (2, 128), (1, 64), 8, 1.0, (4, 12)),
    "tiny_offpolicy": Case("tiny_offpolicy", 512, (2, 128), (1, 64), 8, 0.0, (4, 12)),
}
BATCH = 8
LR, WEIGHT_DECAY, BETAS, GRAD_CLIP = 1e-5, 0.01, (0.9, 0.98), 1.0
JSD_BETA, TEMPERATURE = 0.5, 1.0
SEED = 1234


# ----------------------------------------------------------------------------------------------------
# Shared set-up: tokenizer, data, models (built in the worker of our side, read by the TRL worker)
# ----------------------------------------------------------------------------------------------------


def _pseudo_words(rng, n: int) -> list[str]:
    """``n``-ish distinct pronounceable nonsense words: enough distinct byte pairs for a BPE of 32768."""
    cons, vowels = "bcdfghjklmnprstvwz", "aeiou"
    syl = [c + v for c in cons for v in vowels] + [c + v + k for c in cons for v in vowels for k in "nrs"]
    return sorted({"".join(rng.choice(syl) for _ in range(rng.randint(2, 4))) for _ in range(n)})


def build_tokenizer(vocab: int, out_dir: Path):
    """A byte-level BPE with exactly ``vocab`` tokens (EOS and PAD specials), saved to ``out_dir``."""
    import random

    from opd_megatron.tokenization.hf_tok import HFTokenizer
    from opd_megatron.tokenization.train_local import train_hf_bpe

    rng = random.Random(0)
    words = _pseudo_words(rng, 40000)
    # Zipf-like word frequencies, as in text: the BPE learns frequent words whole and splits rare ones.
    cum = list(itertools.accumulate(1.0 / (i + 10) for i in range(len(words))))
    corpus = [
        " ".join(rng.choices(words, cum_weights=cum, k=rng.randint(8, 20))) + "."
        for _ in range(max(2000, vocab // 2))
    ]
    hf = train_hf_bpe(corpus, vocab, specials=(EOS, PAD))
    tok = HFTokenizer(hf.json_str, eos=EOS, pad=PAD)
    if tok.vocab_size != vocab:
        raise RuntimeError(f"the BPE trainer stopped at {tok.vocab_size} tokens, not {vocab}")
    tok.save(out_dir)
    return tok, words, cum


def write_rows(tok, words, cum, case: Case, n: int, path: Path) -> None:
    """``n`` JSONL rows: a prompt of ``case.prompt_tokens`` tokens and a reference completion of
    ``new_tokens / 2 .. new_tokens - 1`` tokens (EOS makes it at most ``new_tokens``)."""
    import random

    from opd_megatron.data.jsonl import PromptRow, write_jsonl

    rng = random.Random(1)

    def text_of(n_tokens: int) -> str:
        ws: list[str] = []
        while not ws or len(tok.encode(" ".join(ws))) < n_tokens:
            ws.append(rng.choices(words, cum_weights=cum)[0])
        ids = tok.encode(" ".join(ws))[:n_tokens]
        return tok.decode(ids)

    rows = []
    for _ in range(n):
        prompt = text_of(rng.randint(*case.prompt_tokens))
        reference = text_of(rng.randint(case.new_tokens // 2, case.new_tokens - 1))
        rows.append(PromptRow(prompt=prompt, domain="synthetic", reference=reference))
    write_jsonl(path, rows)


def model_config(case: Case, which: str, max_len: int):
    from opd_megatron.config import ModelConfig

    layers, hidden = case.teacher if which == "teacher" else case.student
    return ModelConfig(
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=max(1, hidden // 64),
        max_sequence_length=max_len,
        tie_embeddings=True,
    )


# ----------------------------------------------------------------------------------------------------
# Worker processes
# ----------------------------------------------------------------------------------------------------


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def _step_stats(wall: float, cpu: float, rollout: float, teacher: float, tokens: int, extra: dict) -> dict:
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "rollout_s": rollout,
        "teacher_s": teacher,
        "rest_s": wall - rollout - teacher,
        "tokens": tokens,
        **extra,
    }


def ours_worker(conn, case: Case, work: str, threads: int, total_steps: int) -> None:
    """Builds the shared artefacts (tokenizer, rows, checkpoints, HF exports, TRL's row order), then runs
    ``OPDTrainer.train_step`` on command."""
    try:
        warnings.filterwarnings("ignore")
        _set_threads(threads)
        import torch

        from opd_megatron.config import (
            DataConfig,
            LossConfig,
            ParallelConfig,
            RolloutConfig,
            RunConfig,
            TeacherConfig,
            TokenizerConfig,
            TrainConfig,
        )
        from opd_megatron.distributed import destroy_distributed, init_distributed
        from opd_megatron.models.checkpoint import save_checkpoint
        from opd_megatron.models.gpt import build_gpt_model, num_parameters
        from opd_megatron.models.hf_convert import export_hf_checkpoint
        from opd_megatron.train.batch import DataCursor
        from opd_megatron.train.opd import OPDTrainer

        work_p = Path(work)
        tok, words, cum = build_tokenizer(case.vocab, work_p / "tokenizer")
        n_rows = BATCH * total_steps
        write_rows(tok, words, cum, case, n_rows, work_p / "train.jsonl")
        max_len = case.prompt_tokens[1] + case.new_tokens + 16
        tok_cfg = TokenizerConfig(kind="hf", path=str(work_p / "tokenizer"))
        groups = init_distributed(ParallelConfig(), SEED)
        params, ckpts = {}, {}
        for which, seed in (("teacher", 1), ("student", 2)):
            mcfg = model_config(case, which, max_len)
            model = build_gpt_model(mcfg, groups, case.vocab, seed=seed)
            params[which] = num_parameters(model)
            ckpt = save_checkpoint(
                work_p / which,
                0,
                model,
                groups,
                config=RunConfig(model=mcfg, tokenizer=tok_cfg),
                tokenizer=tok,
            )
            export_hf_checkpoint(ckpt, work_p / f"hf_{which}", groups)
            ckpts[which] = str(ckpt)
            del model
        cfg = RunConfig(
            name=f"bench_{case.name}",
            model=model_config(case, "student", max_len),
            tokenizer=tok_cfg,
            teachers=[TeacherConfig(name="teacher", checkpoint=ckpts["teacher"])],
            loss=LossConfig(divergence="jsd", jsd_beta=JSD_BETA, on_policy_lambda=case.on_policy_lambda),
            rollout=RolloutConfig(max_new_tokens=case.new_tokens, temperature=TEMPERATURE),
            train=TrainConfig(
                steps=total_steps,
                micro_batch_size=BATCH,
                lr=LR,
                min_lr=LR,
                lr_schedule="constant",
                warmup_steps=0,
                weight_decay=WEIGHT_DECAY,
                adam_beta1=BETAS[0],
                adam_beta2=BETAS[1],
                grad_clip=GRAD_CLIP,
                seed=SEED,
                eval_every=0,
                output_dir=str(work_p / "run"),
                init_checkpoint=ckpts["student"],
                progress=False,
            ),
            data=DataConfig(domains=[], train_path=str(work_p / "train.jsonl"), seed=0),
        )
        trainer = OPDTrainer(cfg, groups)
        _set_threads(threads)

        # The rows of every step in the order this trainer draws them: TRL reads them in this order.
        order = DataCursor(len(trainer.train_rows), cfg.data.seed).take(n_rows)
        eos = tok.eos_id
        trl_rows = []
        for i in order:
            row = trainer.train_rows[i]
            p, c = trainer.prompt_fn(row), tok.encode(row.reference) + [eos]
            trl_rows.append(
                {"prompt": row.prompt, "input_ids": p + c, "completion_mask": [0] * len(p) + [1] * len(c)}
            )
        (work_p / "trl_rows.json").write_text(json.dumps(trl_rows))

        # Bench-side instrumentation only: keep the step's batch to count tokens and EOS exactly.
        seen = {}
        make = trainer.rollouts.make

        def make_and_keep(*a, **kw):
            seen["batch"] = b = make(*a, **kw)
            return b

        trainer.rollouts.make = make_and_keep
        prompt_lens = [len(r["input_ids"]) - sum(r["completion_mask"]) for r in trl_rows]
        conn.send(
            (
                "ready",
                {
                    "params": params,
                    "prompt_tokens": [min(prompt_lens), statistics.mean(prompt_lens), max(prompt_lens)],
                    "eos_id": eos,
                    "pad_id": tok.pad_id,
                    "threads": torch.get_num_threads(),
                },
            )
        )
        step = 0
        while True:
            cmd = conn.recv()
            if cmd[0] == "stop":
                break
            _, n_warm, n_timed = cmd
            out = []
            for k in range(n_warm + n_timed):
                c0, t0 = time.process_time(), time.perf_counter()
                rec = trainer.train_step(step)
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                step += 1
                if rec.get("skipped") and "time_rollout" not in rec:
                    raise RuntimeError(f"step {step} skipped: {rec.get('reason')}")
                b = seen.pop("batch")
                gen = b.generated_tokens
                # The record carries the generated tokens only as a rate: check it against the batch.
                from_rec = rec["rollout_tokens_per_s"] * rec["time_rollout"]
                assert abs(from_rec - gen) < 1e-6 * max(gen, 1) + 1e-6, (from_rec, gen)
                on = b.n_on > 0
                out.append(
                    _step_stats(
                        wall,
                        cpu,
                        rec["time_rollout"],
                        rec["time_score"],
                        gen if on else b.tokens,
                        {
                            "warmup": k < n_warm,
                            "update_s": rec["time_update"],
                            "generated_tokens": gen,
                            "loss_tokens": b.tokens,
                            "eos_rows": sum(1 for c in b.comps[: b.n_on] if c and c[-1] == eos),
                            "rows": len(b.comps),
                            "loss": rec["loss"],
                            "threads": torch.get_num_threads(),
                        },
                    )  # fmt: skip
                )
            conn.send(("records", out))
        destroy_distributed()
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        raise


def trl_worker(conn, case: Case, work: str, threads: int, total_steps: int, eos_id: int, pad_id: int) -> None:
    """TRL's ``GKDTrainer.train()`` on the same weights and rows; pauses after each block of steps."""
    try:
        warnings.filterwarnings("ignore")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        _set_threads(threads)
        import torch
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
        from transformers.utils import logging as hf_logging
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        hf_logging.disable_progress_bar()
        work_p = Path(work)
        tok = PreTrainedTokenizerFast(
            tokenizer_file=str(work_p / "tokenizer" / "tokenizer.json"), eos_token=EOS, pad_token=PAD
        )
        assert tok.eos_token_id == eos_id and tok.pad_token_id == pad_id, (tok.eos_token_id, tok.pad_token_id)

        def load(which):
            m = AutoModelForCausalLM.from_pretrained(str(work_p / f"hf_{which}"), dtype=torch.float32)
            for c in (m.config, m.generation_config):
                c.eos_token_id, c.pad_token_id, c.bos_token_id = eos_id, pad_id, None
            return m

        student, teacher = load("student"), load("teacher")
        rows = json.loads((work_p / "trl_rows.json").read_text())
        meter = {"rollout": 0.0, "teacher": 0.0, "generated": 0, "loss_tokens": 0, "eos_rows": 0, "rows": 0}

        class TimedGKD(GKDTrainer):
            def generate_on_policy_outputs(self, model, inputs, generation_config):
                t0 = time.perf_counter()
                ids, mask, labels = GKDTrainer.generate_on_policy_outputs(model, inputs, generation_config)
                meter["rollout"] += time.perf_counter() - t0
                comp_mask = mask[:, inputs["prompts"].shape[1] :]
                comp = ids[:, inputs["prompts"].shape[1] :]
                meter["generated"] += int(comp_mask.sum())
                meter["eos_rows"] += int(((comp == eos_id) & comp_mask.bool()).any(dim=1).sum())
                return ids, mask, labels

            def compute_loss(self, model, inputs, *a, **kw):
                meter["loss_tokens"] += int((inputs["labels"][:, 1:] != -100).sum())
                meter["rows"] += int(inputs["labels"].shape[0])
                return super().compute_loss(model, inputs, *a, **kw)

        args = GKDConfig(
            output_dir=str(work_p / "trl_out"),
            per_device_train_batch_size=BATCH,
            gradient_accumulation_steps=1,
            max_steps=total_steps,
            learning_rate=LR,
            lr_scheduler_type="constant",
            weight_decay=WEIGHT_DECAY,
            adam_beta1=BETAS[0],
            adam_beta2=BETAS[1],
            max_grad_norm=GRAD_CLIP,
            lmbda=case.on_policy_lambda,
            beta=JSD_BETA,
            temperature=TEMPERATURE,
            max_new_tokens=case.new_tokens,
            use_cpu=True,
            bf16=False,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            seed=SEED,
            train_sampling_strategy="sequential",
            dataloader_num_workers=0,
            # TRL's SFTConfig (GKDConfig's parent) defaults to gradient checkpointing, and GKDTrainer then
            # generates without a KV cache (use_cache=False) and recomputes activations in backward.
            # Ours does neither, so TRL runs without it too (its fastest configuration here).
            gradient_checkpointing=False,
        )

        state = {"remaining": 0, "timed_from": 0, "n": 0, "out": [], "t0": 0.0, "c0": 0.0}

        def wait_for_command() -> bool:
            cmd = conn.recv()
            if cmd[0] == "stop":
                return False
            state.update(remaining=cmd[1] + cmd[2], timed_from=cmd[1], n=0, out=[])
            return True

        def start_clock():
            for k in ("rollout", "teacher", "generated", "loss_tokens", "eos_rows", "rows"):
                meter[k] = 0 if isinstance(meter[k], int) else 0.0
            state["c0"], state["t0"] = time.process_time(), time.perf_counter()

        class Pacer(TrainerCallback):
            def on_step_end(self, a, s, control, **kw):
                wall, cpu = time.perf_counter() - state["t0"], time.process_time() - state["c0"]
                on = case.on_policy_lambda > 0
                state["out"].append(
                    _step_stats(
                        wall,
                        cpu,
                        meter["rollout"],
                        meter["teacher"],
                        meter["generated"] if on else meter["loss_tokens"],
                        {
                            "warmup": state["n"] < state["timed_from"],
                            "generated_tokens": meter["generated"],
                            "loss_tokens": meter["loss_tokens"],
                            "eos_rows": meter["eos_rows"],
                            "rows": meter["rows"],
                            "threads": torch.get_num_threads(),
                        },
                    )  # fmt: skip
                )
                state["n"] += 1
                state["remaining"] -= 1
                if state["remaining"] == 0:
                    conn.send(("records", state["out"]))
                    if not wait_for_command():
                        control.should_training_stop = True
                start_clock()
                return control

        trainer = TimedGKD(
            model=student, teacher_model=teacher, args=args, train_dataset=Dataset.from_list(rows),
            processing_class=tok, callbacks=[Pacer()],
        )  # fmt: skip

        def teacher_pre(*_):
            meter["_t"] = time.perf_counter()

        def teacher_post(*_):
            meter["teacher"] += time.perf_counter() - meter["_t"]

        trainer.teacher_model.register_forward_pre_hook(teacher_pre)
        trainer.teacher_model.register_forward_hook(teacher_post)
        _set_threads(threads)
        conn.send(("ready", {"threads": torch.get_num_threads(), "optimizer": args.optim}))
        if wait_for_command():
            start_clock()
            trainer.train()
            if state["remaining"] == 0:  # train() ended with the last block: wait for the stop
                while wait_for_command():
                    conn.send(("error", "TRL worker: no steps left in its run"))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        raise


# ----------------------------------------------------------------------------------------------------
# Parent: interleave the two sides, aggregate, report
# ----------------------------------------------------------------------------------------------------


def _recv(proc, conn, what: str):
    while not conn.poll(5.0):
        if not proc.is_alive():
            raise RuntimeError(f"{what} worker died (exit code {proc.exitcode})")
    kind, payload = conn.recv()
    if kind == "error":
        raise RuntimeError(f"{what} worker failed:\n{payload}")
    return payload


def _start(ctx, target, args, what: str):
    parent, child = ctx.Pipe()
    proc = ctx.Process(
        target=target, args=(child, *args), name=what
    )  # not daemonic: checkpoint saving starts processes
    proc.start()
    child.close()
    return proc, parent


def _summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run_case(case: Case, args, ctx) -> dict:
    total = args.rounds * (args.warmup + args.steps)
    with tempfile.TemporaryDirectory(prefix=f"opd_step_{case.name}_") as work:
        t_setup = time.perf_counter()
        ours = _start(ctx, ours_worker, (case, work, args.threads, total), "ours")
        info = _recv(*ours, "ours")
        trl = _start(
            ctx, trl_worker, (case, work, args.threads, total, info["eos_id"], info["pad_id"]), "trl"
        )
        trl_info = _recv(*trl, "trl")
        print(f"[{case.name}] set up in {time.perf_counter() - t_setup:.0f} s: {info}", flush=True)
        sides = {"ours": ours, "trl": trl}
        rounds = []
        try:
            for r in range(args.rounds):
                order = ("ours", "trl") if r % 2 == 0 else ("trl", "ours")
                rec = {"order": list(order), "load_1m_before": os.getloadavg()[0]}
                for side in order:
                    proc, conn = sides[side]
                    conn.send(("run", args.warmup, args.steps))
                    rec[side] = _recv(proc, conn, side)
                rounds.append(rec)
                line = " ".join(
                    f"{s} {sum(x['tokens'] for x in rec[s] if not x['warmup']) / sum(x['wall_s'] for x in rec[s] if not x['warmup']):.1f} tok/s"
                    for s in ("ours", "trl")
                )
                print(
                    f"[{case.name}] round {r + 1}/{args.rounds} (load {rec['load_1m_before']:.1f}): {line}",
                    flush=True,
                )
        finally:
            for proc, conn in sides.values():
                if proc.is_alive():
                    conn.send(("stop",))
            for proc, _ in sides.values():
                proc.join(60)
                if proc.is_alive():
                    proc.terminate()
    return {
        "case": asdict(case),
        "ours_info": info,
        "trl_info": trl_info,
        "rounds": rounds,
        **aggregate(rounds),
    }


def aggregate(rounds: list[dict]) -> dict:
    out = {}
    round_rate = {s: [] for s in ("ours", "trl")}
    round_cpu_rate = {s: [] for s in ("ours", "trl")}
    for side in ("ours", "trl"):
        steps = [x for r in rounds for x in r[side] if not x["warmup"]]
        for r in rounds:
            timed = [x for x in r[side] if not x["warmup"]]
            tokens = sum(x["tokens"] for x in timed)
            round_rate[side].append(tokens / sum(x["wall_s"] for x in timed))
            round_cpu_rate[side].append(tokens / sum(x["cpu_s"] for x in timed))
        out[side] = {
            "tokens_per_s_step": _summary([x["tokens"] / x["wall_s"] for x in steps]),
            "tokens_per_s_round": _summary(round_rate[side]),
            "tokens_per_step": _summary([x["tokens"] for x in steps]),
            "eos_rows_per_step": _summary([x["eos_rows"] for x in steps]),
            **{
                k: _summary([x[k] for x in steps])
                for k in ("wall_s", "cpu_s", "rollout_s", "teacher_s", "rest_s")
            },
        }
    ratios = [o / t for o, t in zip(round_rate["ours"], round_rate["trl"])]
    cpu_ratios = [o / t for o, t in zip(round_cpu_rate["ours"], round_cpu_rate["trl"])]
    out["ratio_round"] = _summary(ratios)
    out["ratio_cpu_round"] = _summary(cpu_ratios)
    out["ratio_of_step_medians"] = (
        out["ours"]["tokens_per_s_step"]["median"] / out["trl"]["tokens_per_s_step"]["median"]
    )
    return out


def _fmt(s: dict, spec: str = ".2f") -> str:
    return f"{s['median']:{spec}} ({s['min']:{spec}}-{s['max']:{spec}})"


def report(results: list[dict]) -> str:
    lines = []
    for res in results:
        c = res["case"]
        p = res["ours_info"]["params"]
        loads = [r["load_1m_before"] for r in res["rounds"]]
        lines += [
            f"### {c['name']}: vocab {c['vocab']}, teacher {c['teacher'][0]}L/{c['teacher'][1]} ({p['teacher'] / 1e6:.2f}M), "
            f"student {c['student'][0]}L/{c['student'][1]} ({p['student'] / 1e6:.2f}M), {c['new_tokens']} new tokens, "
            f"lambda {c['on_policy_lambda']:g}",
            "",
            f"load average (1 min) before the rounds: {', '.join(f'{x:.1f}' for x in loads)}",
            "",
            "| side | tokens/s per round | tokens/s per step | tokens/step | step s | cpu s | rollout s | teacher s | loss+update s |",
            "|------|-------------------:|------------------:|------------:|-------:|------:|----------:|----------:|--------------:|",
        ]
        for side in ("ours", "trl"):
            s = res[side]
            lines.append(
                f"| {side} | {_fmt(s['tokens_per_s_round'], '.1f')} | {_fmt(s['tokens_per_s_step'], '.1f')} | "
                f"{_fmt(s['tokens_per_step'], '.0f')} | {_fmt(s['wall_s'], '.3f')} | {_fmt(s['cpu_s'], '.3f')} | "
                f"{_fmt(s['rollout_s'], '.3f')} | {_fmt(s['teacher_s'], '.3f')} | {_fmt(s['rest_s'], '.3f')} |"
            )
        phases = ", ".join(
            f"{k} {res['trl'][k + '_s']['median'] / max(res['ours'][k + '_s']['median'], 1e-9):.2f}x"
            for k in ("rollout", "teacher", "rest")
            if res["trl"][k + "_s"]["median"] > 0
        )
        lines += [
            "",
            f"TRL / ours time per phase (medians; rest = loss+update): {phases or 'none timed'}",
            "",
            f"ours / TRL tokens/s: rounds {_fmt(res['ratio_round'])}, medians of steps "
            f"{res['ratio_of_step_medians']:.2f}; by CPU time: rounds {_fmt(res['ratio_cpu_round'])}",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cases", default="compute,small,small_offpolicy", help=f"comma separated: {', '.join(CASES)}"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side per round")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side per round")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of each side")
    parser.add_argument("--out", default="bench_results/opd_step.json")
    parser.add_argument("--markdown", default=None, help="also write the tables to this file")
    args = parser.parse_args()

    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    ctx = mp.get_context("spawn")
    results = []
    for name in args.cases.split(","):
        results.append(run_case(CASES[name], args, ctx))
    text = report(results)
    print("\n" + text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "threads": args.threads,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "steps": args.steps,
        "load_1m_end": os.getloadavg()[0],
    }
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"wrote {out}")
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")


if __name__ == "__main__":  # spawned workers and dist_checkpointing re-import this module: keep the guard
    main()
