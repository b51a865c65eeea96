"""Convert a Hugging Face Llama/Qwen2/Qwen3/Qwen3-MoE safetensors checkpoint into a Megatron distributed checkpoint.

    python tools/convert_hf_to_megatron.py HF_DIR OUT_DIR [--dtype bf16]
    torchrun --nproc-per-node 4 tools/convert_hf_to_megatron.py HF_DIR OUT_DIR --tp 2 --pp 2
    torchrun --nproc-per-node 8 tools/convert_hf_to_megatron.py QWEN3_MOE_DIR OUT_DIR --ep 8

The result loads at any TP/PP; converting at TP*PP ranks spreads the conversion's memory over them.
Same as ``opd-megatron convert hf-to-megatron``.
"""

import argparse
import sys

from opd_megatron.models.hf_convert import add_hf_to_megatron_args, run_convert

if __name__ == "__main__":  # dist_checkpointing starts a multiprocessing Manager: keep the guard
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_hf_to_megatron_args(parser)
    sys.exit(run_convert(parser.parse_args(namespace=argparse.Namespace(direction="hf-to-megatron"))))
