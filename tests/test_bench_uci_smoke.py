"""Smoke test of the UCI benchmark's per-split function (bench/uci.py): one split of yacht, tiny settings."""
import importlib.util
import math
import sys
import time
from pathlib import Path

import pytest
import torch

from qbayes.data.uci import UCI_SETS
from qbayes.data.text import data_dir

BENCH = Path(__file__).resolve().parents[1] / "bench" / "uci.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_uci", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def one_thread():
    """Tiny ops run far faster on one thread (and two threads crawl on a busy 2-core machine)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.mark.skipif(not (data_dir() / "uci" / UCI_SETS["yacht"] / "data").is_dir(), reason="UCI data not found")
def test_run_split_yacht_sghmc_is_finite_and_fast(one_thread):
    uci = _load_bench()
    cfg = uci.Config(map_max_epochs=40, map_eval_every=10, map_patience=20, la_steps=30,
                     sghmc_burnin=10, sghmc_samples=5, sghmc_thin=2)
    t0 = time.perf_counter()
    out = uci.run_split("yacht", 0, ("sghmc",), cfg)
    assert time.perf_counter() - t0 < 10
    assert set(out) == {"sghmc"}
    r = out["sghmc"]
    for key in ("rmse", "test_ll", "step_size", "seconds"):
        assert math.isfinite(r[key]), (key, r[key])
    assert r["rmse"] > 0 and r["samples"] == 5
