"""What every benchmark records beside its numbers: the code (git commit), the exact command,
the machine, and where results go. ``write_results`` is the one way a benchmark saves.

    from common import RESULTS, machine, write_results   # bench scripts run as `python bench/x.py`
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def git_commit() -> str:
    """HEAD's commit, with ``+dirty`` when code under ``qbayes/`` or ``bench/`` (results aside) is
    uncommitted; ``$QBAYES_COMMIT`` where the tree travelled without git (a lent GPU machine)."""
    if os.environ.get("QBAYES_COMMIT"):
        return os.environ["QBAYES_COMMIT"]

    def git(*a):
        try:
            return subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True).stdout.strip()
        except OSError:  # no git on this machine
            return ""

    sha = git("rev-parse", "HEAD") or "unknown"
    dirty = [ln for ln in git("status", "--porcelain", "--", "qbayes", "bench").splitlines()
             if "bench/results/" not in ln]
    return sha + ("+dirty" if dirty else "")


def command() -> str:
    """The command that is running, as typed from the repository root."""
    argv = [str(Path(sys.argv[0]).resolve().relative_to(ROOT)) if Path(sys.argv[0]).resolve().is_relative_to(ROOT)
            else sys.argv[0], *sys.argv[1:]]
    return "python " + shlex.join(argv)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(threads: int | None = None) -> dict:
    import torch

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": threads or torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


def provenance() -> dict:
    return {"commit": git_commit(), "command": command(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def write_results(name: str, res: dict, markdown: str | None = None, provenance_of: dict | None = None) -> Path:
    """Write ``bench/results/<name>.json`` (``res`` with ``commit``, ``command`` and ``date`` first)
    and, if given, ``<name>.md``. ``provenance_of`` keeps the provenance of a result that was
    only re-rendered."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    prov = provenance_of if provenance_of is not None else provenance()
    out = {**prov, **{k: v for k, v in res.items() if k not in prov}}
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    tmp.replace(path)
    if markdown is not None:
        (RESULTS / f"{name}.md").write_text(markdown)
    return path
