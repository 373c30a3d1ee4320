"""README blocks of the uncertainty benchmarks: Fashion-MNIST calibration, UCI regression, the
multimodal sampler test and normalizing flows (each function renders one block of bench/readme.py)."""
from __future__ import annotations

from readme_text import minus, para


# ----- uncertainty (bench/calibration.py, bench/uci.py, bench/sgmcmc_mixture.py, bench/flows.py) -

def calibration(res: dict) -> str:
    st = res["protocol"]["settings"]
    cs, vi, vb = st["csghmc"], st["mfvi"], st["vbll"]

    def epochs(n):
        return f"{n} epoch{'s' if n != 1 else ''}"

    label = {"map": "MAP", "laplace_ll_kron": "last-layer K-FAC Laplace (probit)",
             "laplace_all_diag": "all-weights diagonal Laplace (MC-GGN, linearised MC)",
             "csghmc": f"cyclical SGHMC ensemble ({cs['cycles']} cycles × {cs['samples_per_cycle']} samples)",
             "mfvi": f"mean-field VI (Bayes by Backprop, {epochs(vi['epochs'])} from the MAP)",
             "vbll": f"VBLL head ({epochs(vb['epochs'])})"}
    rows = res["rows"]
    cols = [("acc", ".4f", max), ("nll", ".4f", min), ("ece", ".4f", min), ("brier", ".4f", min),
            ("ood_auroc", ".3f", max)]
    best = {k: pick(r[k] for r in rows) for k, _, pick in cols}
    lines = ["| method | accuracy | NLL | ECE | Brier | OOD AUROC |", "|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"**{r[k]:{fmt}}**" if r[k] == best[k] else f"{r[k]:{fmt}}" for k, fmt, _ in cols]
        lines.append(f"| {label.get(r['method'], r['method'])} | " + " | ".join(cells) + " |")
    by = {r["method"]: r for r in rows}
    mp, ll = by["map"], by["laplace_ll_kron"]
    verdict = ("Last-layer Laplace lowers ECE below the MAP's at the same accuracy."
               if ll["ece"] < mp["ece"] and abs(ll["acc"] - mp["acc"]) < 0.002
               else "Last-layer Laplace does NOT lower ECE below the MAP's at the same accuracy.")
    s, m = res["speed"], res["protocol"]["machine"]
    plain = s["plain_steps_per_s"]
    fits = len(s.get("runs_laplace_ll_kron_fit_s", [])) or 1
    lines += ["", para(
        f"{verdict} Speed on the same CNN ({m}, {s['threads']} threads, batch 128, median of {s['repeats']} "
        f"interleaved rounds of {s['steps']} steps): a plain PyTorch Adam step {plain:.1f} steps/s, a qbayes SGLD "
        f"step {s['sgld_steps_per_s']:.1f} ({s['sgld_steps_per_s'] / plain:.2f}×), an SGHMC step "
        f"{s['sghmc_steps_per_s']:.1f} ({s['sghmc_steps_per_s'] / plain:.2f}×); the last-layer K-FAC Laplace fit "
        f"over all 60k images takes {s['laplace_ll_kron_fit_s']:.1f} s (median of {fits}), "
        f"{s['laplace_ll_kron_fit_s'] / s['plain_epoch_s']:.1f}× one epoch of plain training "
        f"({s['plain_epoch_s']:.1f} s). Full tables and protocol: `bench/results/calibration.{{json,md}}`.")]
    return "\n".join(lines)


UCI_NAMES = {"wine": "wine (red)"}


def uci(res: dict) -> str:
    rows, pub = res["rows"], res["published"]
    cmp = res["protocol"]["vs_mc_dropout"]["best_qbayes"]
    by = {(r["dataset"], r["method"]): r for r in rows}
    lines = ["| data set | best qbayes (method) | MAP | Laplace | MC-dropout | PBP |", "|---|---|---|---|---|---|"]
    for ds, c in cmp.items():
        b = by[ds, c["best_method"]]
        lines.append(f"| {UCI_NAMES.get(ds, ds)} | {minus(b['test_ll'])} ± {b['test_ll_se']:.2f} "
                     f"({c['best_method'].upper()}) | {minus(by[ds, 'map']['test_ll'])} | "
                     f"{minus(by[ds, 'laplace']['test_ll'])} | {minus(pub['mc_dropout'][ds]['test_ll'])} | "
                     f"{minus(pub['pbp'][ds]['test_ll'])} |")
    wins = sum(c["matches_or_beats"] for c in cmp.values())
    ties = [ds for ds, c in cmp.items()
            if abs(c["test_ll"] - c["mc_dropout_ll"]) < by[ds, c["best_method"]]["test_ll_se"]]
    notes = []
    if ties:
        notes.append(f"{', '.join(ties[:-1]) + ' and ' if len(ties) > 1 else ''}{ties[-1]} "
                     f"{'is a tie' if len(ties) == 1 else 'are ties'} within a standard error")
    notes += [f"{ds} falls short by {c['mc_dropout_ll'] - c['test_ll']:.2f}" for ds, c in cmp.items()
              if not c["matches_or_beats"]]
    cores = res["protocol"]["machine"].split(", ")[1].split()[0]
    return "\n".join(lines + ["", para(
        f"The best qbayes method matches or beats MC-dropout on {wins} of {len(cmp)}"
        + (f" ({'; '.join(notes)})" if notes else "") + ". Hyperparameters were tuned once for all sets on held-out "
        "training rows. RMSE, MFVI and VBLL rows, and the protocol: `bench/results/uci.{json,md}` "
        f"({res['protocol']['runtime_s'] / 60:.1f} min on {cores} cores).")])


def sgmcmc(res: dict) -> str:
    p = res["protocol"]
    s = {r["method"]: r for r in res["summary"]}
    sg, cs = s["sgld"], s["csgld"]
    steps = f"{p['steps'] // 1000}k" if p["steps"] % 1000 == 0 else str(p["steps"])
    mode = "mode" if sg["modes_visited_median"] == 1 else "modes"
    return para(f"On the {p['modes']}-Gaussian mixture of cSG-MCMC ({steps} steps, {len(p['seeds'])} seeds) plain "
                f"SGLD stays in {sg['modes_visited_median']:g} {mode} (per-dimension variance "
                f"{sg['var_per_dim_mean']:.2f}; true {p['true_var_per_dim']:.2f}) while cyclical SGLD visits a median "
                f"of {cs['modes_visited_median']:g} (variance {cs['var_per_dim_mean']:.2f}): "
                "`bench/results/sgmcmc_mixture.md`.")


def flows(res: dict) -> str:
    cell = {(r["energy"], r["flow"], r["layers"]): r["kl"] for r in res["rows"]}
    ks = sorted({r["layers"] for r in res["rows"]})
    energies = sorted({r["energy"] for r in res["rows"]})
    falls = ("falls with the number of layers in every cell" if res["acceptance"]["holds"]
             else "does NOT fall with the number of layers in every cell")
    return para(f"Planar and radial flows fitted to the energies {energies[0]}–{energies[-1]} of Rezende & Mohamed: "
                f"the KL to the target (log Z by quadrature minus the ELBO) {falls} (e.g. U3 planar "
                + " → ".join(f"{cell['U3', 'planar', k]:.3f}" for k in ks)
                + f" nats for K = {', '.join(map(str, ks))}): `bench/results/flows.md`.")
