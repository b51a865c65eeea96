"""``opd-megatron align``: show why positions of a text align or not between two tokenizers.

For a text and two tokenizers (student, teacher) it prints both tokenisations with byte spans, the
groups (1:1, splits, merges), the KL mask and the alignment rates by content class. A tokenizer is given
as a saved directory (or its descriptor file), as ``KIND:PATH`` for a tokenizer's own file
(``sentencepiece:m.model``, ``hf:tokenizer.json``, ``tiktoken:ranks.tiktoken``), or as ``demo:KIND`` for
a small tokenizer trained on the spot from the built-in demo corpus.
"""

from __future__ import annotations

import argparse
import json
import sys

from opd_megatron.tokenization.alignment import Alignment, align_completion, alignment_stats, classify_tokens
from opd_megatron.tokenization.base import Tokenizer, TokenizerError

__all__ = ["add_align_parser", "format_report", "load_tokenizer_spec", "run_align"]


def load_tokenizer_spec(spec: str) -> Tokenizer:
    """Tokenizer from a CLI spec: ``demo:KIND``, ``KIND:PATH`` or a saved directory/descriptor."""
    from opd_megatron.config import TokenizerConfig
    from opd_megatron.tokenization import load_tokenizer

    kind, sep, rest = spec.partition(":")
    if sep and kind == "demo":
        from opd_megatron.tokenization import train_local

        trainers = {
            "sentencepiece": train_local.train_sentencepiece,
            "hf": train_local.train_hf_bpe,
            "tiktoken": train_local.train_tiktoken,
        }
        if rest not in trainers:
            raise TokenizerError(f"unknown demo tokenizer {rest!r}; choose from {', '.join(trainers)}")
        return trainers[rest]()
    if sep and kind in ("char", "sentencepiece", "tiktoken", "hf"):
        return load_tokenizer(TokenizerConfig(kind=kind, path=rest))
    return load_tokenizer(spec)


def _show(b: bytes) -> str:
    # bytes of a cut character show as \xNN; newlines and tabs escaped so each token stays on one line
    text = b.decode("utf-8", errors="backslashreplace").replace("\n", "\\n").replace("\t", "\\t")
    return f"'{text}'"


def _tokens(a_bytes: list[bytes], ids: list[int], tok: Tokenizer, rng: tuple[int, int]) -> str:
    return " ".join(
        _show(a_bytes[k]) if a_bytes[k] else (tok.special_token_text(ids[k]) or f"<{ids[k]}>")
        for k in range(*rng)
    )


def format_report(
    text: str, a: Alignment, s_ids: list[int], t_ids: list[int], s_tok: Tokenizer, t_tok: Tokenizer
) -> str:
    """Human-readable report of one alignment (tokenisations, groups, mask, rates)."""
    lines = [f"text: {text!r} ({len(text.encode('utf-8'))} bytes)"]
    for name, tok, ids, tb, spans in (
        ("student", s_tok, s_ids, a.student_bytes, a.student_spans),
        ("teacher", t_tok, t_ids, a.teacher_bytes, a.teacher_spans),
    ):
        lines.append(f"{name}: {tok!r}, {len(ids)} tokens")
        lines += [
            f"  [{k}] id={i} bytes={s}-{e} {_tokens(tb, ids, tok, (k, k + 1))}"
            for k, (i, (s, e)) in enumerate(zip(ids, spans))
        ]
    lines.append("groups (student tokens | teacher tokens | bytes | shape | KL?):")
    for g in a.groups:
        n, m = g.shape
        why = "aligned" if g.aligned else ("differing bytes" if not g.exact else "boundaries disagree inside")
        if g.exact and not g.aligned and (n == 0 or m == 0):
            why = "no counterpart"
        lines.append(
            f"  s{g.student[0]}:{g.student[1]} [{_tokens(a.student_bytes, s_ids, s_tok, g.student)}] | "
            f"t{g.teacher[0]}:{g.teacher[1]} [{_tokens(a.teacher_bytes, t_ids, t_tok, g.teacher)}] | "
            f"{g.span[0]}-{g.span[1]} | {n}:{m} | {why}"
        )
    classes = classify_tokens(a.student_bytes)
    lines.append("mask (student positions that receive the KL):")
    lines.append("  " + " ".join(f"{k}:{int(m)}{c[0]}" for k, (m, c) in enumerate(zip(a.mask, classes))))
    lines.append("  (class initials: p=prose d=digits c=code n=nonascii)")
    stats = alignment_stats([a])
    lines.append(f"common boundaries (bytes): {a.common_boundaries}")
    rates = ", ".join(
        f"{c} {stats[f'align/rate_{c}']:.2f} (n={int(stats[f'align/tokens_{c}'])})"
        for c in ("prose", "digits", "code", "nonascii")
        if stats[f"align/tokens_{c}"]
    )
    lines.append(f"alignment rate: {a.rate:.2f} over {len(a.mask)} student tokens; by class: {rates or '-'}")
    return "\n".join(lines)


def add_align_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("align", help="show how two tokenizers align on a text (cross-tokenizer OPD)")
    configure_align_parser(p)
    p.set_defaults(func=run_align)
    return p


def configure_align_parser(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="the text to tokenise twice")
    src.add_argument("--text-file", help="read the text from this file ('-' for stdin)")
    p.add_argument(
        "--student", default="demo:sentencepiece", help="student tokenizer (default: demo:sentencepiece)"
    )
    p.add_argument("--teacher", default="demo:hf", help="teacher tokenizer (default: demo:hf)")
    p.add_argument("--eos", action="store_true", help="append each tokenizer's EOS, as a finished completion")
    p.add_argument("--json", action="store_true", help="print the alignment as JSON instead of a report")


def run_align(args: argparse.Namespace) -> int:
    if args.text is not None:
        text = args.text
    elif args.text_file == "-":
        text = sys.stdin.read()
    else:
        with open(args.text_file, encoding="utf-8") as f:
            text = f.read()
    s_tok, t_tok = load_tokenizer_spec(args.student), load_tokenizer_spec(args.teacher)
    s_ids = s_tok.encode(text) + ([s_tok.eos_id] if args.eos else [])
    t_ids = t_tok.encode(text) + ([t_tok.eos_id] if args.eos else [])
    a = align_completion(s_tok, s_ids, t_tok, t_ids)
    if args.json:
        out = {
            "student_ids": s_ids,
            "teacher_ids": t_ids,
            "student_spans": a.student_spans,
            "teacher_spans": a.teacher_spans,
            "groups": [
                {"student": g.student, "teacher": g.teacher, "span": g.span, "aligned": g.aligned}
                for g in a.groups
            ],
            "mask": a.mask,
            "teacher_index": a.teacher_index,
            "stats": {k: (None if v != v else v) for k, v in alignment_stats([a]).items()},  # NaN -> null
        }
        print(json.dumps(out))
    else:
        print(format_report(text, a, s_ids, t_ids, s_tok, t_tok))
    return 0
