"""Time and peak memory of HF <-> Megatron checkpoint conversion on a locally built Llama.

Builds a randomly initialised ``LlamaForCausalLM`` from a config (nothing is downloaded), saves it as
sharded HF safetensors, then runs ``tools/convert_hf_to_megatron.py`` and ``tools/convert_megatron_to_hf.py``
each in its own process, measuring that process's wall time, the conversion time it reports, and its peak
resident memory (its own ``VmHWM``, printed as it exits). A tiny model converted the same way gives the
fixed cost of a process (Python, torch, Megatron-core), so the report also gives the peak memory above that
baseline as a multiple of the checkpoint size: streaming means about 1x, never 2x. Finally the exported
tensors are compared with the original ones.

    python tools/bench/bench_convert.py [--preset 125m] [--dtype bf16] [--out bench_results/convert.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PRESETS = {
    # Llama-shaped, GQA with 3 query heads per key/value head, a 32k vocabulary.
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
    ),
    "125m": dict(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
    "350m": dict(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
}


def build_hf_model(directory: Path, preset: str, dtype: str) -> int:
    """Save a random HF Llama of ``preset`` into ``directory``; returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**PRESETS[preset], max_position_embeddings=2048, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(getattr(torch, {"bf16": "bfloat16", "fp32": "float32"}[dtype]))
    model.save_pretrained(directory, max_shard_size="200MB")
    return sum(p.numel() for p in model.parameters())


def run_measured(cmd: list[str]) -> dict:
    """Run ``cmd`` (a tool under ``_WRAPPER``): its wall time, the conversion time the tool reports and
    the peak RSS the wrapper prints as the process exits."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    m = re.search(r"wrote .* in ([0-9.]+)s", out)
    peak = re.search(r"PEAK_RSS_KB=(\d+)", out + err)
    return {
        "wall_s": round(wall, 2),
        "convert_s": float(m.group(1)) if m else None,
        "peak_rss_mib": round(int(peak.group(1)) / 1024, 1) if peak else None,
    }


_WRAPPER = """
import re, runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    # VmHWM: this process's resident high-water mark. Not ru_maxrss: Linux carries that across exec from
    # the parent, which holds the HF model it just built.
    peak_kb = re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)
    print("PEAK_RSS_KB=" + peak_kb, flush=True)
"""


def convert_both_ways(hf_dir: Path, work: Path) -> dict:
    tool = [sys.executable, "-c", _WRAPPER]
    meg, back = work / "megatron", work / "hf_back"
    return {
        "hf_to_megatron": run_measured(
            [*tool, str(REPO / "tools/convert_hf_to_megatron.py"), str(hf_dir), str(meg)]
        ),
        "megatron_to_hf": run_measured(
            [
                *tool,
                str(REPO / "tools/convert_megatron_to_hf.py"),
                str(meg),
                str(back),
                "--max-shard-size",
                "200MB",
            ]
        ),
    }


def identical(a: Path, b: Path) -> bool:
    import torch

    from opd_megatron.models.hf_safetensors import HFWeights

    wa, wb = HFWeights(a), HFWeights(b)
    return sorted(wa.names()) == sorted(wb.names()) and all(
        torch.equal(wa.read(n), wb.read(n)) for n in wa.names()
    )


def dir_mib(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="125m")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--out", default="bench_results/convert.json")
    ap.add_argument("--workdir", default=None, help="keep the checkpoints here (default: a temp dir)")
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_convert_"))
    try:
        results: dict = {"preset": args.preset, "dtype": args.dtype, "config": PRESETS[args.preset]}
        for name in ("tiny", args.preset):  # the tiny run measures the process's fixed cost
            hf_dir = work / name / "hf"
            params = build_hf_model(hf_dir, name, args.dtype)
            runs = convert_both_ways(hf_dir, work / name)
            runs["round_trip_identical"] = identical(hf_dir, work / name / "hf_back")
            runs["params"] = params
            runs["hf_checkpoint_mib"] = dir_mib(hf_dir)
            results["baseline" if name == "tiny" else "model"] = runs
        model, base = results["model"], results["baseline"]
        for direction in ("hf_to_megatron", "megatron_to_hf"):
            above = model[direction]["peak_rss_mib"] - base[direction]["peak_rss_mib"]
            model[direction]["peak_above_baseline_mib"] = round(above, 1)
            model[direction]["peak_above_baseline_x_checkpoint"] = round(
                above / model["hf_checkpoint_mib"], 2
            )
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps(results, indent=2))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
