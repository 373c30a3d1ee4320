"""Posterior samplers on Gaussian-mixture inverse problems, against the exact posterior (issue 15).

Acceptance: the sliced Wasserstein distance to the exact posterior for each sampler; the SMC
sampler's distance falls as particles grow and is below DPS's at 256 particles.

Protocol (recorded in the JSON): the 25-component prior of MCGdiff (Cardoso et al. 2023, §4.1):
means 8·(i, j, i, j, ...) for i, j in -2..2, unit covariances, equal weights, in d = 2, 8, 20
dimensions, and its exact denoiser eps* (qbayes.diffusion.gmm). Per seed (0, 1, 2): A = U diag(s) V
with U (m x m) and V (first m rows of d x d) Haar-random orthogonal and singular values s sorted
U(0, 1) (our reading of MCGdiff's construction), m = 1, 2, 5 for d = 2, 8, 20; x* drawn from the
prior, y = A x* + 0.05 n. Linear schedule, T = 1000. Samplers, n = 1000 samples each, seeded:
DPS (1000 DDPM steps, eta = 1, the paper's normalised step with zeta = 1 on the norm, as its code),
PiGDM (100 DDIM steps, eta = 1, the paper's r_t^2 = 1 - abar_t, i.e. unit data variance; a second
row 'pigdm (v=129)' with r_t^2 from the prior's per-coordinate variance 129), RED-diff (1000
descending steps, Adam lr 0.1, lambda 0.25, started at A^+ y; point estimates), and SMC = TDS
(100 DDIM steps, eta = 1, PiGDM twist with data_var = 129, systematic resampling at ESS < 0.5 N)
with N = 16, 64, 256 particles per posterior sample: each of the 1000 samples is one particle
drawn by the final weights of its own independent run (1000 N particles in all); in d = 2 also
the twist with data_var = 1 at N = 256. Metric: sliced W2 (500 random directions, the same for
all rows of a seed) between the 1000 samples and 10,000 exact posterior samples; 'exact
(noise floor)' is 1000 fresh exact samples. Table: median over the 3 seeds (per-seed values in
the JSON); seconds are wall time per sampler on one thread (two worker processes, one per core).

    python bench/inverse_gmm.py            # writes bench/results/inverse_gmm.{json,md,png}
"""
from __future__ import annotations

import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, provenance, write_results  # noqa: E402

from qbayes.diffusion.gmm import random_mixture  # noqa: E402
from qbayes.diffusion.operators import Linear  # noqa: E402
from qbayes.diffusion.posterior import dps, pigdm, reddiff, smc  # noqa: E402
from qbayes.diffusion.schedule import Schedule  # noqa: E402
from qbayes.eval.sliced_wasserstein import random_directions, sliced_wasserstein  # noqa: E402

DIMS = {2: 1, 8: 2, 20: 5}
SEEDS = (0, 1, 2)
SIGMA_Y, N_SAMPLES, N_REF, PROJECTIONS = 0.05, 1000, 10_000, 500
PARTICLES = (16, 64, 256)


def problem(d: int, seed: int):
    m = DIMS[d]
    prior = random_mixture(d, 25, seed=0)
    g = torch.Generator().manual_seed(1000 * seed + d)
    U = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    s = torch.sort(torch.rand(m, generator=g, dtype=torch.float64), descending=True).values
    op = Linear(U @ torch.diag(s) @ V[:m])
    y = op.measure(prior.sample(1, g), SIGMA_Y, g)[0]
    return prior, op, y, g


def samplers(d: int, v: float):
    S = [("dps", None, 1000, lambda e, Sc, op, y, g: dps(e, Sc, op, y, SIGMA_Y, N_SAMPLES, 1000, g, dtype=torch.float64)),
         ("pigdm", None, 100, lambda e, Sc, op, y, g: pigdm(e, Sc, op, y, SIGMA_Y, N_SAMPLES, 100, g, dtype=torch.float64)),
         (f"pigdm (v={v:g})", None, 100,
          lambda e, Sc, op, y, g: pigdm(e, Sc, op, y, SIGMA_Y, N_SAMPLES, 100, g, data_var=v, dtype=torch.float64)),
         ("reddiff", None, 1000, lambda e, Sc, op, y, g: reddiff(e, Sc, op, y, SIGMA_Y, N_SAMPLES, 1000, g, dtype=torch.float64))]
    for N in PARTICLES:
        S.append(("smc", N, 100, lambda e, Sc, op, y, g, N=N: smc(e, Sc, op, y, SIGMA_Y, N_SAMPLES, 100, g, particles=N,
                                                                   data_var=v)))
    if d == 2:
        S.append(("smc (v=1)", 256, 100, lambda e, Sc, op, y, g: smc(e, Sc, op, y, SIGMA_Y, N_SAMPLES, 100, g, particles=256)))
    return S


def run(task, seeds=SEEDS, n_samples=N_SAMPLES):
    global SEEDS, N_SAMPLES
    SEEDS, N_SAMPLES = seeds, n_samples  # a spawned worker starts from the module defaults
    d, seed = task
    torch.set_num_threads(1)
    prior, op, y, g = problem(d, seed)
    v = round(float(prior.cov().diagonal().mean()), 6)
    post = prior.posterior(op, y, SIGMA_Y)
    ref, fresh = post.sample(N_REF, g), post.sample(N_SAMPLES, g)
    th = random_directions(PROJECTIONS, d, torch.Generator().manual_seed(seed))
    base = {"d": d, "m": DIMS[d], "sigma_y": SIGMA_Y, "seed": seed, "metric": "sw", "samples": N_SAMPLES}
    rows = [{**base, "sampler": "exact (noise floor)", "particles": None, "steps": None,
             "value": sliced_wasserstein(fresh, ref, directions=th), "seconds": 0.0}]
    keep = {"exact": fresh[:400]} if d == 2 and seed == 0 else None
    Sc = Schedule.linear(1000)
    eps = prior.eps_model(Sc)
    for i, (name, N, steps, f) in enumerate(samplers(d, v)):
        t0 = time.perf_counter()
        out = f(eps, Sc, op, y, torch.Generator().manual_seed(10_000 * seed + 100 * d + i))
        secs = time.perf_counter() - t0
        x = out.samples if hasattr(out, "samples") else out
        row = {**base, "sampler": name, "particles": N, "steps": steps, "value": sliced_wasserstein(x, ref, directions=th),
               "seconds": round(secs, 2)}
        if hasattr(out, "ess"):
            row["final_ess_median"] = round(float(out.ess[-1].median()), 1)
            row["min_ess_median"] = round(float(out.ess.min(0).values.median()), 1)
            row["resample_rate"] = round(float(out.resampled.float().mean()), 3)
        rows.append(row)
        if keep is not None:
            keep[name if N is None else f"{name} N={N}"] = x[:400].double()
        print(f"d={d} seed={seed} {name:>16} N={N}: SW {row['value']:.3f} ({secs:.1f} s)", flush=True)
    return rows, keep


def summarise(rows):
    out = []
    keys = sorted({(r["d"], r["sampler"], r["particles"] or 0) for r in rows},
                  key=lambda k: (k[0], _order(k[1]), k[2]))
    for d, name, N in keys:
        rs = [r for r in rows if r["d"] == d and r["sampler"] == name and (r["particles"] or 0) == N]
        r0 = rs[0]
        out.append({k: r0[k] for k in ("d", "m", "sigma_y", "sampler", "particles", "steps", "samples", "metric")}
                   | {"value": round(statistics.median(r["value"] for r in rs), 4),
                      "values": [round(r["value"], 4) for r in sorted(rs, key=lambda r: r["seed"])],
                      "seconds": round(statistics.median(r["seconds"] for r in rs), 2)})
    return out


def _order(name):
    first = ("exact (noise floor)", "dps", "pigdm")
    return first.index(name) if name in first else 3 if name.startswith("pigdm") else 4 if name == "reddiff" else 5


def acceptance(summary):
    checks = {}
    for d in DIMS:
        sw = {r["particles"]: r["value"] for r in summary if r["d"] == d and r["sampler"] == "smc"}
        dps_sw = next(r["value"] for r in summary if r["d"] == d and r["sampler"] == "dps")
        checks[f"d={d}"] = {"smc_falls_16_to_256": sw[256] < sw[16], "smc_monotone": sw[16] >= sw[64] >= sw[256],
                            "smc256_below_dps": sw[256] < dps_sw}
    return checks


def plot(keep):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [k for k in keep if k != "exact"]
    fig, axes = plt.subplots(2, (len(names) + 1) // 2, figsize=(3.2 * ((len(names) + 1) // 2), 6.4), sharex=True, sharey=True)
    ex = keep["exact"]
    for ax, name in zip(axes.flat, names):
        ax.scatter(ex[:, 0], ex[:, 1], s=4, c="0.6", label="exact posterior")
        ax.scatter(keep[name][:, 0], keep[name][:, 1], s=4, c="C3", label=name)
        ax.set_title(name, fontsize=9)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="upper left")
    fig.suptitle("d = 2, seed 0: 400 exact posterior samples (grey) vs each sampler (red)", fontsize=10)
    fig.tight_layout()
    fig.savefig(RESULTS / "inverse_gmm.png", dpi=110)


def markdown(res):
    lines = ["# Posterior samplers on Gaussian-mixture inverse problems (issue 15)", "",
             f"Commit {res['commit']}; command `{res['command']}`; {res['date']}. Machine: {res['machine']['cpu']}, "
             f"{res['machine']['cores']} cores, torch {res['machine']['torch']}.", "", res["protocol"], "",
             "| d | m | sampler | particles/sample | steps | SW2 (median of 3 seeds) | per seed | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['d']} | {r['m']} | {r['sampler']} | {r['particles'] or ''} | {r['steps'] or ''} | "
                     f"{r['value']:.3f} | {', '.join(f'{v:.3f}' for v in r['values'])} | {r['seconds']:.1f} |")
    lines += ["", "Acceptance (on the medians): " + "; ".join(
        f"{d}: SMC falls 16→256 {c['smc_falls_16_to_256']}, monotone {c['smc_monotone']}, SMC@256 < DPS "
        f"{c['smc256_below_dps']}" for d, c in res["acceptance"].items()), "",
        "![d = 2 scatter](inverse_gmm.png)", ""]
    return "\n".join(lines)


def main():
    global SEEDS, N_SAMPLES
    quick = "--quick" in sys.argv  # a smoke run: one seed, 100 samples, nothing written
    if quick:
        SEEDS, N_SAMPLES = (0,), 100
    prov = provenance()
    tasks = sorted(((d, s) for d in DIMS for s in SEEDS), key=lambda t: -t[0])
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(2) as pool:
        results = pool.starmap(run, [(t, SEEDS, N_SAMPLES) for t in tasks], chunksize=1)
    rows = [r for rs, _ in results for r in rs]
    keep = next(k for _, k in results if k is not None)
    summary = summarise(rows)
    res = {**prov, "protocol": " ".join(__doc__.split("Protocol (recorded in the JSON):")[1].split("python bench")[0].split()),
           "machine": machine(1) | {"workers": 2}, "rows": summary, "acceptance": acceptance(summary), "runs": rows,
           "wall_seconds": round(time.perf_counter() - t0, 1)}
    if quick:
        print(markdown(res))
        return
    plot(keep)
    write_results("inverse_gmm", res, markdown(res), provenance_of=prov)
    print(markdown(res))


if __name__ == "__main__":
    main()
