"""Convert a Megatron checkpoint of this project (saved at any TP/PP) into Hugging Face safetensors.

    python tools/convert_megatron_to_hf.py CKPT_DIR OUT_DIR [--dtype bf16] [--max-shard-size 5GB]

Writes ``config.json``, the safetensors shards (with an index when there are several) and the tokenizer
files stored at import. Same as ``opd-megatron convert megatron-to-hf``.
"""

import argparse
import sys

from opd_megatron.models.hf_convert import add_megatron_to_hf_args, run_convert

if __name__ == "__main__":  # dist_checkpointing starts a multiprocessing Manager: keep the guard
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_megatron_to_hf_args(parser)
    sys.exit(run_convert(parser.parse_args(namespace=argparse.Namespace(direction="megatron-to-hf"))))
