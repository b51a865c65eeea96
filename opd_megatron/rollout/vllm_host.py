"""Where a vLLM engine lives: in this process, or in a helper process this rank owns.

vLLM builds its own ``torch.distributed`` world when it starts. In a process that is alone in its
world (a single-rank run, a test) the engine runs right here (``VLLM_ENABLE_V1_MULTIPROCESSING=0``:
engine core, scheduler and model in this process; start-up takes seconds). In a trainer rank that is
part of a larger world, vLLM would try to create its groups on *our* world and every other rank would
have to take part; so there the engine runs in-process inside one helper process spawned by this rank,
and tensors cross over through shared memory (``torch.multiprocessing`` passes a CPU tensor's storage
by file descriptor: a refit copies no weights through disk or a socket).

Both hosts run the same :class:`_EngineCore`; only the call transport differs. Settings every engine
gets: ``enforce_eager=True`` (no 30 s compile), an explicit KV-cache size (the CPU backend refuses to
guess), the tokenizer skipped (prompts are token ids; the built-in character tokenizer has no HF files),
fp32 or bf16 weights, and its cache and RPC socket directories in a private temporary directory.

Several in-process engines can live side by side (a student engine and a vLLM teacher), but they share
vLLM's process-wide parallel state, and in a single-rank world vLLM adopts this process's default
``torch.distributed`` group: closing an in-process engine breaks the other engines and this process's
Megatron groups (measured: a model built afterwards had no TP group). Close engines at the end of a run.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

__all__ = [
    "EngineStartError",
    "RefitError",
    "VLLMSettings",
    "start_engine_host",
    "transfer_backend",
    "vllm_import_error",
]


class EngineStartError(RuntimeError):
    """The engine could not start; the message names the setting to change."""


class RefitError(ValueError):
    """Weights offered to the engine do not match its model; the message names the tensor."""


def vllm_import_error() -> str | None:
    """``None`` when vLLM imports here, else why not (one line)."""
    try:
        import vllm  # noqa: F401
    except Exception as e:  # ImportError, or a broken install (e.g. CUDA-linked torchvision)
        return f"vllm is not importable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


@dataclass
class VLLMSettings:
    """Engine settings (from ``rollout.vllm_*`` or ``teachers[i].vllm_*``)."""

    kv_cache_bytes: int
    """KV-cache memory of the engine; must hold at least one ``max_sequence_length`` sequence."""
    max_sequence_length: int
    """vLLM's ``max_model_len``: longest prompt + completion."""
    max_num_seqs: int = 64
    """Most sequences the engine batches together."""
    dtype: str = "float32"
    seed: int = 0
    max_logprobs: int = 20
    """Largest top-k of prompt log-probs the engine may be asked for."""
    block_size: int | None = None
    """KV-cache block size in tokens (a multiple of 32 on CPU); ``None`` keeps vLLM's default."""
    setting_prefix: str = "rollout.vllm_"
    """How error messages name these settings (``rollout.vllm_`` or ``teachers[i].vllm_``)."""
    weight_transfer: str | None = None
    """GPU only: the vLLM weight-transfer backend refits go through (``nccl`` / ``ipc``; see
    :mod:`~opd_megatron.rollout.vllm_transfer`); ``None``: the worker's ``reload_weights``."""
    sleep_mode: bool = False
    """GPU only: the engine can sleep (offload its weights, free its KV cache) while the trainer runs."""
    cuda_device: int | None = None
    """GPU only: the device the engine runs on, in a helper process of its own (``separate``)."""

    @property
    def kv_setting(self) -> str:
        return f"{self.setting_prefix}kv_cache_mb"


def transfer_backend(placement: str, cuda: bool) -> str | None:
    """The vLLM weight-transfer backend for ``rollout.vllm_placement`` (``None``: the CPU reload path).
    ``separate`` (the engine on its own GPU): ``nccl``; ``colocated`` on a GPU: ``ipc``, because NCCL
    cannot pair two ranks on one device."""
    if not cuda:
        return None
    return "nccl" if placement == "separate" else "ipc"


def _set_engine_env(workdir: str) -> None:
    """vLLM reads these from the environment (it has no arguments for them)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CACHE_ROOT", os.path.join(workdir, "cache"))
    rpc = os.path.join(workdir, "rpc")
    os.makedirs(rpc, exist_ok=True)
    os.environ["VLLM_RPC_BASE_PATH"] = rpc
    # vLLM reports usage statistics over the network by default.
    os.environ["VLLM_NO_USAGE_STATS"] = "1"
    os.environ["DO_NOT_TRACK"] = "1"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def _cpu_head_sizes() -> list[int] | None:
    if torch.cuda.is_available():
        return None
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    return CPUAttentionBackend.get_supported_head_sizes()


class _EngineCore:
    """Owns one ``vllm.LLM``. ``model`` is an HF model directory, or an HF ``config.json`` dict (the
    engine then starts with placeholder weights and the caller loads the real ones with :meth:`load`)."""

    def __init__(self, model: str | dict, settings: VLLMSettings, workdir: str):
        _set_engine_env(workdir)
        self.settings = settings
        if isinstance(model, dict):
            hf_dir = Path(workdir) / "hf"
            hf_dir.mkdir(parents=True, exist_ok=True)
            (hf_dir / "config.json").write_text(json.dumps(model))
            config, load_format = model, "dummy"
        else:
            hf_dir, load_format = Path(model), "auto"
            config = json.loads((hf_dir / "config.json").read_text())
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        sizes = _cpu_head_sizes()
        if sizes is not None and head_dim not in sizes:
            raise EngineStartError(
                f"head size {head_dim} (hidden_size / num_attention_heads) is not supported by vLLM's CPU "
                f"attention; supported: {sizes}"
            )
        from vllm import LLM

        kwargs: dict = {"block_size": settings.block_size} if settings.block_size else {}
        if settings.weight_transfer:
            kwargs["weight_transfer_config"] = {"backend": settings.weight_transfer}
        if settings.sleep_mode:
            kwargs["enable_sleep_mode"] = True
        try:
            self.llm = LLM(
                model=str(hf_dir),
                dtype=settings.dtype,
                enforce_eager=True,
                kv_cache_memory_bytes=int(settings.kv_cache_bytes),
                max_model_len=settings.max_sequence_length,
                max_num_seqs=settings.max_num_seqs,
                seed=settings.seed,
                skip_tokenizer_init=True,
                load_format=load_format,
                max_logprobs=settings.max_logprobs,
                # Behaviour log-probs of what was actually sampled: after temperature and top-k/top-p
                # (greedy requests get the plain log-softmax), as the Rollout type defines them.
                logprobs_mode="processed_logprobs",
                **kwargs,
            )
        except Exception as e:
            text = str(e)
            if "KV cache" in text or "cache blocks" in text or "max_model_len" in text:
                mb = settings.kv_cache_bytes / 2**20
                raise EngineStartError(
                    f"{settings.kv_setting}={mb:g} is too small for max_sequence_length="
                    f"{settings.max_sequence_length} (vLLM: {_first_line(e)}); raise the KV cache or lower "
                    "max_sequence_length"
                ) from None
            raise EngineStartError(f"vLLM engine failed to start: {_first_line(e)}") from e
        self.tied = bool(config.get("tie_word_embeddings", False))

    # -- weights --------------------------------------------------------------------------------
    def load(self, state: dict[str, torch.Tensor], reset_prefix_cache: bool = True) -> float:
        """Copy ``state`` (HF names, already validated) into the engine's parameters; seconds taken."""
        t0 = time.perf_counter()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(state.items())})
        if self.tied:
            self.llm.apply_model(_repack_tied_head)
        if reset_prefix_cache:
            # Cached prefix KV was computed by the old weights; reusing it gives wrong tokens.
            self.llm.reset_prefix_cache()
        return time.perf_counter() - t0

    def reset_prefix_cache(self) -> None:
        self.llm.reset_prefix_cache()

    # -- GPU weight transfer (vllm.entrypoints.rl; see rollout.vllm_transfer) --------------------
    def transfer_init(self, init_info: dict) -> None:
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def transfer_start(self) -> None:
        self.llm.start_weight_update()

    def transfer_update(self, update_info) -> None:
        self.llm.update_weights({"update_info": update_info})

    def transfer_finish(self) -> None:
        self.llm.finish_weight_update()

    def sleep(self) -> None:
        """Offload the weights to host memory and free the KV cache (``enable_sleep_mode`` engines)."""
        self.llm.sleep(level=1)

    def wake_up(self) -> None:
        self.llm.wake_up()

    def memory(self) -> dict[str, int]:
        import psutil

        return {
            "kv_cache_bytes": int(self.settings.kv_cache_bytes),
            "host_rss_bytes": int(psutil.Process().memory_info().rss),
        }

    # -- inference ------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: dict, seeds: list[int | None]) -> list[tuple]:
        """``(token_ids, logprobs, finish_reason, stop_reason)`` per prompt, in prompt order."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        sps = [SamplingParams(**params, seed=s) for s in seeds]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sps, use_tqdm=False)
        result = []
        for o in outs:
            c = o.outputs[0]
            ids = list(c.token_ids)
            lps = [float(step[t].logprob) for step, t in zip(c.logprobs, ids)]
            result.append((ids, lps, c.finish_reason, c.stop_reason))
        return result

    def prompt_topk(self, seqs: list[list[int]], k: int) -> list[tuple[list, list, list]]:
        """Per sequence of ``L`` tokens, ``L - 1`` rows: (top-k ids, their log-probs, the actual token's
        log-prob), from vLLM's ``prompt_logprobs`` (temperature 1, raw logits)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        sp = SamplingParams(max_tokens=1, prompt_logprobs=k, detokenize=False)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in seqs], sp, use_tqdm=False)
        result = []
        for s, o in zip(seqs, outs):
            ids, values, token_lp = [], [], []
            for pos in range(1, len(s)):
                entries = o.prompt_logprobs[pos]
                # Keyed by token id; always holds the actual token, which may rank below the top k.
                ranked = sorted(entries.items(), key=lambda kv: kv[1].rank)[:k]
                ids.append([int(t) for t, _ in ranked])
                values.append([float(v.logprob) for _, v in ranked])
                token_lp.append(float(entries[s[pos]].logprob))
            result.append((ids, values, token_lp))
        return result

    def close(self) -> None:
        del self.llm


def _repack_tied_head(model) -> None:
    """Re-run the output layer's post-load processing. With tied embeddings vLLM's in-place reload
    refreshes the embedding but not the CPU GEMM kernel's pre-packed copy of the (shared) output
    weight, which keeps the old weights' logits until this runs (measured: stale greedy tokens)."""
    head = model.lm_head
    head.quant_method.process_weights_after_loading(head)


# ------------------------------------------------------------------------------------------------
# Hosts
# ------------------------------------------------------------------------------------------------


class _LocalHost:
    def __init__(self, model, settings: VLLMSettings, workdir: str):
        self.core = _EngineCore(model, settings, workdir)

    def call(self, method: str, *args):
        return getattr(self.core, method)(*args)

    def close(self) -> None:
        self.core.close()


def _serve(conn, model, settings_dict: dict, workdir: str) -> None:
    """Helper process: start the engine, then answer calls until ``close`` or the parent goes away."""
    try:
        core = _EngineCore(model, VLLMSettings(**settings_dict), workdir)
    except Exception as e:
        conn.send(("error", type(e).__name__, str(e)))
        return
    conn.send(("ok", None))
    while True:
        try:
            method, args = conn.recv()
        except EOFError:
            return
        if method == "close":
            conn.send(("ok", None))
            return
        try:
            conn.send(("ok", getattr(core, method)(*args)))
        except Exception as e:
            conn.send(("error", type(e).__name__, str(e)))


_ERRORS = {"EngineStartError": EngineStartError, "RefitError": RefitError, "ValueError": ValueError}


class _ProcessHost:
    def __init__(self, model, settings: VLLMSettings, workdir: str):
        import torch.multiprocessing as tmp

        ctx = tmp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        # The helper must not inherit this rank's torchrun identity: vLLM would join our world.
        # An engine on a GPU of its own sees only that one (the spawned child reads the environment).
        own_gpu = settings.cuda_device is not None
        keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT") + (
            ("CUDA_VISIBLE_DEVICES",) if own_gpu else ()
        )
        saved = {k: os.environ.pop(k) for k in keys if k in os.environ}
        if own_gpu:
            os.environ["CUDA_VISIBLE_DEVICES"] = str(settings.cuda_device)
        try:
            self.proc = ctx.Process(
                target=_serve, args=(child, model, asdict(settings), workdir), daemon=True
            )
            self.proc.start()
        finally:
            if own_gpu:
                os.environ.pop("CUDA_VISIBLE_DEVICES")
            os.environ.update(saved)
        child.close()
        self._answer()

    def _answer(self):
        try:
            reply = self.conn.recv()
        except EOFError:
            raise EngineStartError(
                f"the vLLM helper process exited (code {self.proc.exitcode}) without an answer"
            ) from None
        if reply[0] == "error":
            raise _ERRORS.get(reply[1], RuntimeError)(reply[2])
        return reply[1]

    def call(self, method: str, *args):
        self.conn.send((method, args))
        return self._answer()

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(("close", ()))
                self.conn.recv()
            except (EOFError, OSError, BrokenPipeError):
                pass
            self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


def start_engine_host(model, settings: VLLMSettings, in_process: bool | None = None):
    """Start an engine for ``model`` (an HF directory or an HF config dict); returns a host with
    ``call(method, *args)`` and ``close()``. ``in_process=None`` picks this process when it is alone in
    its ``torch.distributed`` world (or has none), else a helper process."""
    import torch.distributed as dist

    if settings.kv_cache_bytes <= 0:
        raise EngineStartError(f"{settings.kv_setting} must be > 0")
    if settings.cuda_device is not None:
        in_process = False  # its own device: only a helper process can see just that one
    elif in_process is None:
        in_process = not dist.is_initialized() or dist.get_world_size() == 1
    workdir = tempfile.mkdtemp(prefix="opd_vllm_")
    try:
        host = (_LocalHost if in_process else _ProcessHost)(model, settings, workdir)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    host.workdir = workdir
    return host
