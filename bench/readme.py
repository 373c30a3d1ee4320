"""Renders the README's results blocks from the committed results, so every number it quotes
comes from a file that says which commit and command produced it.

README.md marks each block with a pair of comments; everything between them is generated:

    <!-- results:NAME -->
    ...rendered from bench/results/<source>.json...
    <!-- /results:NAME -->

``BLOCKS`` maps each NAME to the results files it reads and the function that renders it (one
per block, in readme_llm.py, readme_speed.py and readme_bayes.py; several blocks may read the
same file). The numbers are computed from the JSON; the prose around them is fixed text, so
after a rerun that changes a conclusion, reread the block. A block whose results file does not
exist yet is left as it is, with a message. tests/test_readme_numbers.py fails when README.md
and this rendering differ.

    python bench/readme.py            # rewrite README.md's blocks from bench/results/*.json
    python bench/readme.py --check    # exit 1 (and say which) if any block is out of date
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Callable, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT  # noqa: E402
from readme_bayes import calibration, flows, sgmcmc, uci  # noqa: E402
from readme_llm import encoder, gguf, gpu_check, llm_ptq, llm_ptq_timing, mixed_budget, mixed_spearman  # noqa: E402
from readme_vision import act_ptq, int8, int8_models, onnx_qdq  # noqa: E402
from readme_speed import decode, kernels, kernels_3bit, kernels_gpu, kernels_smollm2  # noqa: E402

README = ROOT / "README.md"
MARKER = re.compile(r"<!-- results:(?P<name>[\w-]+) -->\n(?P<body>.*?)\n?<!-- /results:(?P=name) -->", re.S)


class Block(NamedTuple):
    sources: tuple[str, ...]          # bench/results/<source>.json, passed to render in this order
    render: Callable[..., str]


def load(source: str) -> dict:
    return json.loads((RESULTS / f"{source}.json").read_text())


BLOCKS: dict[str, Block] = {
    "llm_ptq": Block(("llm_ptq",), llm_ptq),
    "llm_ptq_timing": Block(("llm_ptq",), llm_ptq_timing),
    "gpu_check": Block(("gpu_check",), gpu_check),
    "mixed_budget": Block(("mixed",), mixed_budget),
    "mixed_spearman": Block(("mixed", "mixed_sensitivity"), mixed_spearman),
    "kernels": Block(("kernels",), kernels),
    "kernels_smollm2": Block(("kernels",), kernels_smollm2),
    "kernels_3bit": Block(("kernels",), kernels_3bit),
    "decode": Block(("decode",), decode),
    "kernels_gpu": Block(("kernels_gpu", "sass_gemv"), kernels_gpu),
    "gguf": Block(("gguf", "llm_ptq"), gguf),
    "calibration": Block(("calibration",), calibration),
    "uci": Block(("uci",), uci),
    "sgmcmc": Block(("sgmcmc_mixture",), sgmcmc),
    "flows": Block(("flows",), flows),
    "encoder": Block(("encoder",), encoder),
    "act_ptq": Block(("act_ptq",), act_ptq),
    "int8": Block(("int8",), int8),
    "int8_models": Block(("int8_models",), int8_models),
    "onnx_qdq": Block(("onnx_qdq",), onnx_qdq),
}


def missing_sources(name: str) -> list[str]:
    return [s for s in BLOCKS[name].sources if not (RESULTS / f"{s}.json").exists()]


def render(name: str) -> str:
    """The text of block ``name`` (no leading or trailing newline) from its results files."""
    block = BLOCKS[name]
    return block.render(*(load(s) for s in block.sources)).strip("\n")


def blocks_in(text: str) -> list[tuple[str, str]]:
    """``(name, body)`` of every marker pair in ``text``, in order."""
    return [(m["name"], m["body"]) for m in MARKER.finditer(text)]


def rewrite(text: str, log=print) -> str:
    """``text`` with every block whose results exist re-rendered; the others are left as they are."""
    def sub(m: re.Match) -> str:
        name = m["name"]
        if name not in BLOCKS:
            raise SystemExit(f"README block {name!r} has no renderer in bench/readme.py (known: {', '.join(BLOCKS)})")
        missing = missing_sources(name)
        if missing:
            log(f"skipping block {name!r}: no " + ", ".join(f"bench/results/{s}.json" for s in missing))
            return m[0]
        return f"<!-- results:{name} -->\n{render(name)}\n<!-- /results:{name} -->"

    return MARKER.sub(sub, text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="only report blocks that are out of date (exit 1 if any)")
    ap.add_argument("--readme", type=Path, default=README)
    a = ap.parse_args(argv)
    old = a.readme.read_text()
    opened = len(re.findall(r"^<!-- results:", old, re.M))
    if opened != len(blocks_in(old)):
        raise SystemExit(f"{a.readme}: {opened} opening markers but {len(blocks_in(old))} complete marker pairs")
    new = rewrite(old)
    stale = [n for (n, b), (_, b2) in zip(blocks_in(old), blocks_in(new)) if b != b2]
    if a.check:
        for n in stale:
            print(f"out of date: {n}")
        return 1 if stale else 0
    if new != old:
        a.readme.write_text(new)
    print(f"{a.readme.name}: {len(blocks_in(new))} blocks, rewrote {len(stale)}"
          + (f" ({', '.join(stale)})" if stale else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
