"""Alignment inspector: the same as ``opd-megatron align``, runnable from a checkout.

python tools/inspect_alignment.py --text "What is 12345 + 678?" --student demo:sentencepiece --teacher demo:hf
"""

from __future__ import annotations

import argparse
import sys

from opd_megatron.tokenization.cli import configure_align_parser, run_align


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    configure_align_parser(parser)
    return run_align(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
