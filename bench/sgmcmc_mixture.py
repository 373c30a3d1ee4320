"""SGLD vs cyclical SGLD on the 25-Gaussian mixture of cSG-MCMC (Zhang et al. 2020).

Target: equal-weight mixture of 25 Gaussians with centres (2i, 2j), i, j in -2..2, covariance
0.03 I; true per-dimension variance 8 + 0.03 = 8.03. Both samplers take the same number of
steps with exact gradients from the same start (0, 0). Step sizes follow one rule: samples are
only taken where the step is small enough to reproduce a single mode's width (SGLD's constant
step 0.005 = sigma^2/6 gives a per-mode variance within 10%; cyclical SGLD collects in the last
20% of each cycle, where its step is below 0.0086), so neither sampler wins by running hot. A centre counts as visited when some
collected sample lies within 3 standard deviations (3 * sqrt(0.03)) of it. SGLD collects every
step after burn-in; cyclical SGLD collects in the sampling half of each cycle.

    python bench/sgmcmc_mixture.py     # writes bench/results/sgmcmc_mixture.{json,md}
"""
from __future__ import annotations

import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_name, write_results  # noqa: E402

from qbayes.bayes import schedules, sgmcmc  # noqa: E402

CENTRES = torch.tensor([[2.0 * i, 2.0 * j] for i in range(-2, 3) for j in range(-2, 3)], dtype=torch.float64)
VAR = 0.03
PROTOCOL = {"steps": 50_000, "burnin": 1_000, "sgld_lr": 0.005, "csgld_lr0": 0.09, "cycles": 30, "explore": 0.8,
            "seeds": [0, 1, 2, 3, 4], "temperature": 1.0}


def log_post(params, batch):
    d2 = ((params["x"] - CENTRES) ** 2).sum(1)
    return torch.logsumexp(-d2 / (2 * VAR), 0), None


def run(method: str, seed: int) -> dict:
    torch.manual_seed(seed)
    P = PROTOCOL
    if method == "sgld":
        t = sgmcmc.sgld(log_post, lr=P["sgld_lr"])
        keep = lambda step: step > P["burnin"]
    else:
        cyc = schedules.Cyclical(P["csgld_lr0"], P["steps"], P["cycles"], P["explore"])
        t = sgmcmc.sgld(log_post, lr=cyc.lr, temperature=cyc.temperature(P["temperature"]))
        keep = lambda step: cyc.sampling(step - 1)
    state = t.init({"x": torch.zeros(2, dtype=torch.float64)})
    xs = []
    t0 = time.perf_counter()
    for _ in range(P["steps"]):
        state = t.update(state, None, inplace=True)
        if keep(state.step):
            xs.append(state.params["x"].clone())
    secs = time.perf_counter() - t0
    x = torch.stack(xs)
    dist = torch.cdist(x, CENTRES)
    visited = int((dist < 3 * math.sqrt(VAR)).any(0).sum())
    return {"method": method, "seed": seed, "modes_visited": visited, "var_x": float(x[:, 0].var()),
            "var_y": float(x[:, 1].var()), "samples": len(xs), "seconds": secs}


def main() -> None:
    torch.set_num_threads(1)
    runs = [run(m, s) for m in ("sgld", "csgld") for s in PROTOCOL["seeds"]]
    summary = []
    for m in ("sgld", "csgld"):
        r = [x for x in runs if x["method"] == m]
        summary.append({"method": m, "modes_visited_median": statistics.median(x["modes_visited"] for x in r),
                        "modes_visited": [x["modes_visited"] for x in r],
                        "var_per_dim_mean": statistics.mean((x["var_x"] + x["var_y"]) / 2 for x in r),
                        "steps_per_s": statistics.median(PROTOCOL["steps"] / x["seconds"] for x in r)})
    res = {"protocol": {**PROTOCOL, "true_var_per_dim": 8.03, "modes": 25, "threads": 1,
                        "machine": cpu_name(), "torch": torch.__version__},
           "summary": summary, "runs": runs}
    lines = ["# SGLD vs cyclical SGLD on the 25-Gaussian mixture", "",
             f"Protocol: {PROTOCOL['steps']} steps with exact gradients from (0, 0), seeds {PROTOCOL['seeds']}; "
             f"SGLD lr {PROTOCOL['sgld_lr']} (burn-in {PROTOCOL['burnin']}); cyclical SGLD lr0 {PROTOCOL['csgld_lr0']}, "
             f"{PROTOCOL['cycles']} cycles, first {PROTOCOL['explore']:.0%} of each cycle exploration (temperature 0). "
             "A centre is visited if a collected sample lies within 3 sd of it. True per-dimension variance 8.03.", "",
             "| sampler | modes visited (of 25), per seed | median | per-dimension variance (mean over seeds) | steps/s |",
             "|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['method']} | {s['modes_visited']} | {s['modes_visited_median']} | "
                     f"{s['var_per_dim_mean']:.2f} | {s['steps_per_s']:.0f} |")
    write_results("sgmcmc_mixture", res, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
