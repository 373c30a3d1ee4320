"""Number and paragraph formatting shared by the README renderers (bench/readme.py)."""
from __future__ import annotations

import re
import textwrap


def rng(values, fmt: str = ".2f", sep: str = "–") -> str:
    """``lo–hi`` of ``values`` in ``fmt`` (one number when both ends print the same)."""
    lo, hi = format(min(values), fmt), format(max(values), fmt)
    return lo if lo == hi else f"{lo}{sep}{hi}"


def sig4(x: float) -> str:
    """Four significant digits, whole numbers from 1000 on (12181, 115.4, 40.65)."""
    return f"{x:.0f}" if abs(x) >= 1000 else f"{x:.4g}"


def minus(x: float, fmt: str = ".2f") -> str:
    """A number with a typographic minus (−2.46)."""
    return format(x, fmt).replace("-", "−")


_BLOCK_START = re.compile(r"([-+*>]|#+|\d+[.)]|=+|-+)(\s|$)")


def para(*parts: str) -> str:
    """One Markdown paragraph from ``parts`` (joined as they are), wrapped at 100 columns; a line that
    Markdown would read as a list item, heading or quote is joined to the line before."""
    lines: list[str] = []
    for line in textwrap.wrap("".join(parts), width=100, break_long_words=False, break_on_hyphens=False):
        if lines and _BLOCK_START.match(line):
            lines[-1] += " " + line
        else:
            lines.append(line)
    return "\n".join(lines)


def all_passed(summary: str) -> bool:
    """Whether a pytest summary line ('11 passed in 3.21s') says everything passed."""
    return "passed" in summary and not re.search(r"\d+ (failed|error)", summary)
