"""Saves that die (issue 13): a child process saving over an existing checkpoint is killed at
random points, and a save runs out of space (a file-size limit stands in for a full disk). After
each, the path holds the complete old or the complete new checkpoint, loadable, and no temporary
file remains once the path is next loaded."""
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import qbayes.io as qio
from qbayes import load_quantized

ROOT = Path(__file__).resolve().parents[1]
IDS = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(3))

CHILD = textwrap.dedent("""
    import resource, signal, sys
    sys.path.insert(0, {root!r})
    import torch
    from qbayes import QuantSpec, quantize_, save_quantized
    from tests.conftest import tiny_llama
    path, mode = sys.argv[1], sys.argv[2]
    models = []
    for seed, bits in ((0, 4), (1, 3)):
        m = tiny_llama(seed=seed)
        quantize_(m, QuantSpec(bits, 32), "rtn", progress=False)
        models.append(m)
    if mode == "init":
        save_quantized(models[0], path)
        for i, m in enumerate(models):
            with torch.no_grad():
                torch.save(m(input_ids=torch.load({ids!r}), use_cache=False).logits, path + f".ref{{i}}.pt")
        sys.exit(0)
    if mode == "full-disk":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, like ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, (4_000, 4_000))
        from qbayes import CheckpointError
        try:
            save_quantized(models[1], path)
        except CheckpointError as e:
            print("save failed:", e, flush=True)
            sys.exit(0)
        sys.exit(1)
    print("ready", flush=True)
    i = 1
    while True:  # alternate the two models until killed
        save_quantized(models[i], path)
        i = 1 - i
""")


def _child(tmp_path, *args):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(root=str(ROOT), ids=str(tmp_path / "ids.pt")))
    return subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, text=True, cwd=tmp_path)


def _check(path: Path, refs) -> int:
    """Which of the two models ``path`` holds; asserts it is complete and nothing temporary is left."""
    model, _ = load_quantized(path)  # also removes the partial folder of a killed save
    with torch.no_grad():
        got = model(input_ids=IDS, use_cache=False).logits
    which = [i for i, r in enumerate(refs) if torch.equal(got, r)]
    assert len(which) == 1, "the checkpoint is neither the old nor the new model"
    assert sorted(p.name for p in path.iterdir()) == sorted([qio.META, qio.WEIGHTS])
    left = [p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.qbayes-partial-")]
    assert not left, f"temporary folders left: {left}"
    return which[0]


@pytest.fixture
def initial(tmp_path):
    torch.save(IDS, tmp_path / "ids.pt")
    path = tmp_path / "ckpt"
    assert _child(tmp_path, str(path), "init").wait(timeout=300) == 0
    refs = [torch.load(f"{path}.ref{i}.pt") for i in range(2)]
    return path, refs


def test_killed_saves_leave_the_old_or_the_new_checkpoint(tmp_path, initial):
    path, refs = initial
    rng = random.Random(13)
    seen = set()
    for _ in range(3):
        child = _child(tmp_path, str(path), "loop")
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.6))
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
        seen.add(_check(path, refs))
    assert seen  # each kill left one complete checkpoint (which one depends on where it landed)


def test_a_save_that_runs_out_of_space_keeps_the_old_checkpoint(tmp_path, initial):
    path, refs = initial
    before = (path / qio.WEIGHTS).read_bytes()
    child = _child(tmp_path, str(path), "full-disk")
    out, _ = child.communicate(timeout=300)
    assert child.returncode == 0 and "File too large" in out and "older checkpoint at that path is intact" in out
    assert (path / qio.WEIGHTS).read_bytes() == before
    assert _check(path, refs) == 0
