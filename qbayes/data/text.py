"""Token windows and sentences from text files (the evaluation protocol of the project).

The data folder is ``$QBAYES_DATA``, defaulting to ``../shared/data`` beside the checkout
(resolved from the current directory, then from this package's location).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import CalibrationError, QBayesError

EVAL_TEXT = "wikitext-2-raw/wiki.test.raw"
CALIB_TEXT = "ptb/ptb.valid.txt"


def data_dir() -> Path:
    env = os.environ.get("QBAYES_DATA")
    if env:
        return Path(env)
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        cand = base.parent / "shared" / "data"
        if cand.is_dir():
            return cand
    return Path.cwd().parent / "shared" / "data"


def data_path(relative: str) -> Path:
    p = data_dir() / relative
    if not p.exists():
        raise QBayesError(f"data file {p} not found: set QBAYES_DATA to the folder holding {relative}")
    return p


def readable_text(path: str | Path) -> str:
    """The UTF-8 text of ``path``, after checking it is a regular file (clear errors otherwise)."""
    p = Path(path)
    if not p.exists():
        raise QBayesError(f"text file {p} not found")
    if not p.is_file():
        raise QBayesError(f"{p} is not a regular file: give a UTF-8 text file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise QBayesError(f"{p} is not UTF-8 text (byte {e.start} cannot be decoded): convert it to UTF-8") from None


def tokenize_file(path: str | Path, tokenizer) -> torch.Tensor:
    """The whole file, read at once and tokenized once without special tokens: 1-D int64 ids."""
    p = Path(path)
    text = readable_text(p)
    if not text.strip():
        raise CalibrationError(f"text file {p} is empty")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    return ids.to(torch.long)


def eval_windows(ids: torch.Tensor, seqlen: int = 512, n: int = 40) -> torch.Tensor:
    """The first ``n`` non-overlapping windows of ``seqlen`` tokens: ``(n, seqlen)``."""
    have = ids.numel() // seqlen
    if have < n:
        raise QBayesError(f"the text holds only {have} windows of {seqlen} tokens, {n} asked for")
    return ids[: n * seqlen].view(n, seqlen)


def calibration_windows(ids: torch.Tensor, seqlen: int = 512, n: int = 64, seed: int = 0) -> torch.Tensor:
    """``n`` windows of ``seqlen`` tokens at offsets ``torch.randint(0, N-seqlen+1, (n,))`` seeded."""
    if n <= 0:
        raise CalibrationError(f"the number of calibration samples must be positive, got {n}")
    N = ids.numel()
    if N < seqlen:
        raise CalibrationError(f"calibration text has {N} tokens, fewer than one window of {seqlen}")
    g = torch.Generator().manual_seed(seed)
    offs = torch.randint(0, N - seqlen + 1, (n,), generator=g)
    return torch.stack([ids[o: o + seqlen] for o in offs.tolist()])


def sentence_lines(path: str | Path, min_words: int = 8) -> list[str]:
    """The lines of a text file that are sentences: non-empty, not a WikiText heading
    (`` = Title = ``, `` = = Section = = ``) and at least ``min_words`` words long; stripped."""
    out = []
    for line in readable_text(path).splitlines():
        s = line.strip()
        if s and not (s.startswith("=") and s.endswith("=")) and len(s.split()) >= min_words:
            out.append(s)
    if not out:
        raise CalibrationError(f"{path} has no line of at least {min_words} words")
    return out


def encoder_windows(ids: torch.Tensor, tokenizer, seqlen: int = 128, n: int = 128, seed: int = 0) -> dict:
    """Unpadded calibration batches for a BERT-style encoder: :func:`calibration_windows` of
    ``seqlen - 2`` content tokens, each framed by the tokenizer's ``[CLS]`` / ``[SEP]``, with a full
    attention mask (no padding, so no padded position enters the input statistics)."""
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    if cls is None or sep is None:
        raise QBayesError("encoder_windows needs a tokenizer with [CLS] and [SEP] tokens (a BERT-style encoder)")
    body = calibration_windows(ids, seqlen - 2, n, seed)
    col = torch.ones(n, 1, dtype=body.dtype)
    input_ids = torch.cat([col * cls, body, col * sep], 1)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "token_type_ids": torch.zeros_like(input_ids)}
