"""Normalizing-flow VI on the 2-D test energies U1-U4 of Rezende & Mohamed (2015): KL(q || p) by depth.

Protocol:
  targets      p(z) ∝ exp(-U(z) - wall(z)), U1-U4 of the paper's Table 1 (qbayes.bayes.energies), with
               wall(z) = ½ Σ_i (max(|z_i| - 4, 0)/0.05)² (energies.boxed): the paper's densities on
               the box [-4, 4]² where they are plotted. U2-U4 do not decay in z1, so without the wall
               they have infinite mass and "log Z - ELBO" is no KL (a flow that spreads out along
               z1 beats the box's log Z: we measured -0.24 nats for U2 with 32 planar layers).
  log Z        trapezoid rule in float64 on [-4.5, 4.5]² (1126² points, h = 0.008): the box plus
               ten wall widths; log Z of the bare U on [-4, 4]² (1000² points) is stored alongside.
  flows        planar and radial, K = 2, 8, 32 layers, base N(mu, diag sigma²) learned, float32;
               init FlowSpec(kind, 2, K).init(seed=0) (near-identity layers), mu = 0, sigma = 1.
  fit          STEPS Adam steps (betas 0.9, 0.999, eps 1e-8), lr 1e-2 cosine-decayed to 0,
               N_SAMPLES reparameterised samples per step, noise from torch.Generator seed 0;
               no annealing. The same settings for every cell.
  KL           log Z - ELBO, the ELBO from EVAL_SAMPLES flow samples (generator seed 1), with its
               standard error; fit_s is the wall time of the STEPS updates alone.
  threads      1 (torch.set_num_threads) by default, see THREADS_NOTE.

    python bench/flows.py                  # every cell, writes bench/results/flows.{json,md}
    python bench/flows.py --only U3:planar:8 --steps 2000   # one cell, printed only
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import RESULTS, write_results  # noqa: E402

from qbayes.bayes import energies, flows  # noqa: E402

ENERGY_NAMES, KINDS, LAYERS = ("U1", "U2", "U3", "U4"), ("planar", "radial"), (2, 8, 32)
STEPS, LR, N_SAMPLES, EVAL_SAMPLES = 10_000, 1e-2, 100, 100_000
BOX, WALL, QUAD_LIM, QUAD_N = 4.0, 0.05, 4.5, 1126
THREADS_NOTE = ("1 torch thread: a step works on 100 x 2 tensors, too small to parallelise, and with 2 threads "
                "on this shared 2-core machine MKL's threaded exp/sin/cos took ~10 ms a call while another "
                "process ran (steps 15-40x slower, measured); --threads 2 runs the brief's setting.")


def target(name: str):
    return energies.boxed(energies.ENERGIES[name], lim=BOX, width=WALL)


def fit(name: str, kind: str, K: int, steps: int, eval_samples: int) -> dict:
    U = target(name)
    log_density = lambda z: -U(z)  # noqa: E731
    lr = lambda t: LR * 0.5 * (1 + math.cos(math.pi * t / steps))  # noqa: E731
    tr = flows.build(log_density, dim=2, n_layers=K, kind=kind, lr=lr, n_samples=N_SAMPLES)
    state = tr.init(seed=0, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(steps):
        state = tr.update(state, gen, inplace=True)
    fit_s = time.perf_counter() - t0
    z, log_q = flows.sample(state, eval_samples, torch.Generator().manual_seed(1))
    w = (log_density(z) - log_q).double()
    return {"elbo": float(w.mean()), "elbo_se": float(w.std() / math.sqrt(eval_samples)), "fit_s": fit_s,
            "mu": state.params["mu"].tolist(), "sigma": state.params["log_sigma"].exp().tolist()}


def machine(threads: int) -> dict:
    return {**common.machine(threads), "load_avg_at_start": os.getloadavg()[0]}


def acceptance(rows: list[dict]) -> dict:
    """More layers, lower KL: for every (energy, flow), KL(K=2) > KL(K=8) > KL(K=32)."""
    violations = []
    for name in ENERGY_NAMES:
        for kind in KINDS:
            kl = {r["layers"]: r["kl"] for r in rows if r["energy"] == name and r["flow"] == kind}
            for a, b in zip(LAYERS, LAYERS[1:]):
                if a in kl and b in kl and not kl[b] < kl[a]:
                    violations.append(f"{name} {kind}: KL(K={b}) = {kl[b]:.4f} >= KL(K={a}) = {kl[a]:.4f}")
    return {"criterion": "KL decreases with the number of layers for every energy and flow",
            "holds": not violations, "violations": violations}


def markdown(res: dict) -> str:
    p, m, rows = res["protocol"], res["machine"], res["rows"]
    cell = {(r["energy"], r["flow"], r["layers"]): r for r in rows}
    head = " | ".join(f"K={K}" for K in LAYERS)
    lines = [
        "# Normalizing-flow VI on the Rezende & Mohamed (2015) test energies",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores (shared; load average {m['load_avg_at_start']:.1f} at the start), "
        f"{m['threads']} torch thread(s), torch {m['torch']}, Python {m['python']}. {p['threads_note']}",
        "",
        f"Protocol: targets {p['target']}. log Z: {p['log_z']}. Flows: {p['flows']}. Fit: {p['fit']}. "
        f"KL = log Z - ELBO, ELBO from {p['eval_samples']:,} samples ({p['eval']}).",
        "",
        "KL(q || p) in nats (± one standard error of the ELBO estimate):",
        "",
        f"| energy | flow | {head} | log Z |",
        "|---|---|" + "---|" * len(LAYERS) + "---|",
    ]
    for name in ENERGY_NAMES:
        for kind in KINDS:
            if (name, kind, LAYERS[0]) not in cell:
                continue
            kls = " | ".join(f"{cell[name, kind, K]['kl']:.4f} ± {cell[name, kind, K]['elbo_se']:.4f}"
                             for K in LAYERS)
            lines.append(f"| {name} | {kind} | {kls} | {cell[name, kind, LAYERS[0]]['log_z']:.4f} |")
    lines += ["", "Fit wall time (s) of the Adam steps:", "", f"| energy | flow | {head} |",
              "|---|---|" + "---|" * len(LAYERS)]
    for name in ENERGY_NAMES:
        for kind in KINDS:
            if (name, kind, LAYERS[0]) in cell:
                lines.append(f"| {name} | {kind} | " + " | ".join(f"{cell[name, kind, K]['fit_s']:.1f}" for K in LAYERS) + " |")
    acc = res["acceptance"]
    lines += ["", f"Acceptance ({acc['criterion']}): {'holds in every cell' if acc['holds'] else 'VIOLATED'}."]
    lines += [f"- {v}" for v in acc["violations"]]
    lines += ["", f"Total wall time {res['total_s'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="one cell ENERGY:FLOW:K, e.g. U3:planar:8 (printed, not saved)")
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--eval-samples", type=int, default=EVAL_SAMPLES)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--render", action="store_true", help="rewrite the Markdown from the saved JSON")
    a = ap.parse_args()
    if a.render:
        (RESULTS / "flows.md").write_text(markdown(json.loads((RESULTS / "flows.json").read_text())))
        return
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    cells = [tuple(a.only.split(":"))] if a.only else [(n, k, K) for n in ENERGY_NAMES for k in KINDS for K in LAYERS]
    log_z, log_z_bare = {}, {}
    rows = []
    bar = tqdm(cells, desc="flow VI fits", unit="fit")
    for name, kind, K in bar:
        if name not in log_z:
            log_z[name] = energies.log_partition(target(name), lim=QUAD_LIM, n=QUAD_N)
            log_z_bare[name] = energies.log_partition(energies.ENERGIES[name], lim=BOX, n=1000)
        bar.set_postfix_str(f"{name} {kind} K={K}")
        r = fit(name, kind, int(K), a.steps, a.eval_samples)
        rows.append({"energy": name, "flow": kind, "layers": int(K), "kl": log_z[name] - r["elbo"],
                     "elbo": r["elbo"], "log_z": log_z[name], "fit_s": r["fit_s"], "elbo_se": r["elbo_se"],
                     "base_mu": r["mu"], "base_sigma": r["sigma"]})
        tqdm.write(json.dumps({k: v for k, v in rows[-1].items() if not k.startswith("base")}))
    if a.only:
        return
    res = {
        "protocol": {
            "target": f"exp(-U - wall), U = U1..U4 (Rezende & Mohamed 2015, Table 1), wall = "
                      f"½ Σ_i (max(|z_i| - {BOX}, 0)/{WALL})² (energies.boxed)",
            "log_z": f"trapezoid rule, float64, on [-{QUAD_LIM}, {QUAD_LIM}]², {QUAD_N} points per axis",
            "log_z_bare_box4": log_z_bare,
            "flows": f"planar and radial, K in {list(LAYERS)}, base N(mu, diag sigma²) learned, float32, "
                     "FlowSpec(kind, 2, K).init(seed=0), mu = 0, sigma = 1",
            "fit": f"{a.steps} Adam steps (betas 0.9, 0.999, eps 1e-8), lr {LR} cosine-decayed to 0, "
                   f"{N_SAMPLES} samples per step, noise torch.Generator seed 0, no annealing",
            "eval_samples": a.eval_samples, "eval": "torch.Generator seed 1",
            "steps": a.steps, "lr": LR, "n_samples": N_SAMPLES, "threads": a.threads, "threads_note": THREADS_NOTE,
        },
        "machine": machine(a.threads),
        "rows": rows,
    }
    res["acceptance"] = acceptance(rows)
    res["total_s"] = time.perf_counter() - t_start
    write_results("flows", res, markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
