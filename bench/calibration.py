"""Calibration and out-of-distribution detection of a Fashion-MNIST CNN under several posteriors.

Protocol: the CNN of ``qbayes.models.fashion_cnn`` (2 conv + 2 dense, 225k parameters) trained
to its MAP with Adam (lr 1e-3, batch 128, prior precision 30, i.e. weight decay 30/N) for
15 epochs (trained to convergence, as post-hoc methods assume) on the 60k Fashion-MNIST training images (standardised); every method
starts from that MAP. Test: the 10k Fashion-MNIST test images; OOD: the 10k MNIST test images
(standardised with the Fashion-MNIST statistics). Metrics: accuracy, NLL, ECE (15 equal-width
bins), Brier, and AUROC of predictive entropy for Fashion-MNIST vs MNIST.

Speed (same run, 2 threads): training steps/s of a plain PyTorch step (forward, backward,
Adam), against SGLD and SGHMC steps of qbayes' functional samplers on the same batches, and
the time to fit the last-layer K-FAC Laplace against one epoch of plain training.

    python bench/calibration.py        # writes bench/results/calibration.{json,md}
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, cpu_name, write_results  # noqa: E402

from qbayes.bayes import sgmcmc, workflows as W  # noqa: E402
from qbayes.bayes.base import model_log_posterior  # noqa: E402
from qbayes.data import IMAGE_STATS, load_image_dataset  # noqa: E402
from qbayes.models import fashion_cnn  # noqa: E402
from qbayes.models.zoo import cache_dir  # noqa: E402

PROVENANCE = ("commit", "command", "date")
MAP_EPOCHS = 15
SETTINGS = {
    "map": {},
    "laplace_ll_kron": {"subset": "last_layer", "structure": "kron"},
    # full-network diagonal GGN estimated by Monte Carlo (one sampled label per image) on a
    # 10k-image subset scaled to N; linearised predictive by 20 forward-mode samples
    "laplace_all_diag": {"subset": "all", "structure": "diag", "fisher": "mc", "curvature_subset": 10000,
                         "batch_size": 32, "link_approx": "mc", "n_samples": 20},
    "csghmc": {"epochs": 3, "cycles": 3, "lr": 0.05, "momentum": 0.9, "samples_per_cycle": 4},
    "mfvi": {"epochs": 1, "lr": 1e-3, "n_samples": 8},
    "vbll": {"epochs": 1, "lr": 1e-3},
}


def speed(model, x, y, steps: int = 30, repeats: int = 5) -> dict:
    """Steps per second of plain PyTorch training vs qbayes SGLD/SGHMC on the same batch, and the
    last-layer K-FAC Laplace fit time; medians over ``repeats`` interleaved rounds (so a burst of
    load on the shared machine hits every contender alike)."""
    xb, yb = x[:128], y[:128]
    m = fashion_cnn()
    m.load_state_dict(model.state_dict())
    opt = torch.optim.Adam(m.parameters(), 1e-3)

    def plain():
        loss = torch.nn.functional.cross_entropy(m(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()

    lp = model_log_posterior(m, "classification", len(x), 30.0)
    contenders = {"plain": plain}
    for name, t in (("sgld", sgmcmc.sgld(lp, lr=1e-9)), ("sghmc", sgmcmc.sghmc(lp, lr=1e-4, alpha=100.0))):
        st = t.init({k: v.detach() for k, v in m.named_parameters()})
        contenders[name] = (lambda t, st: lambda: t.update(st, (xb, yb), inplace=True))(t, st)
    runs = {k: [] for k in contenders}
    for f in contenders.values():  # warm-up
        f()
    for _ in range(repeats):
        for k, f in contenders.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                f()
            runs[k].append(steps / (time.perf_counter() - t0))
    out = {f"{k}_steps_per_s": statistics.median(v) for k, v in runs.items()}
    out["runs_steps_per_s"] = runs
    out["plain_epoch_s"] = (len(x) / 128) / out["plain_steps_per_s"]
    fits = []
    for _ in range(3):
        t0 = time.perf_counter()
        W.fit_laplace(model, x, y, **SETTINGS["laplace_ll_kron"])
        fits.append(time.perf_counter() - t0)
    out["laplace_ll_kron_fit_s"], out["runs_laplace_ll_kron_fit_s"] = statistics.median(fits), fits
    out.update(steps=steps, repeats=repeats, threads=torch.get_num_threads())
    return out


def load_map(x, y):
    """The MAP CNN, trained once and cached (deterministic given the seed)."""
    model = fashion_cnn()
    cached = cache_dir() / f"fashion_cnn_map_e{MAP_EPOCHS}_seed0.pt"
    t0 = time.perf_counter()
    if cached.exists():
        model.load_state_dict(torch.load(cached))
        model.eval()
    else:
        W.train_map(model, x, y, epochs=MAP_EPOCHS)
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), cached)
    return model, time.perf_counter() - t0


def machine() -> str:
    return f"{cpu_name()}, {os.cpu_count()} cores"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--speed-only", action="store_true",
                    help="re-measure only the speed section (cached MAP) and rewrite the results with it")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.speed_only:
        x, y = load_image_dataset("fashion-mnist", "train")
        res = json.loads((RESULTS / "calibration.json").read_text())
        res["speed"].update(speed(load_map(x, y)[0], x, y))
        res["protocol"]["machine"] = machine()
        # the file's provenance becomes this command's; the rows keep the run that measured them
        if "rows_provenance" not in res and "commit" in res:
            res["rows_provenance"] = {k: res[k] for k in (*PROVENANCE, "provenance_note") if k in res}
        res = {k: v for k, v in res.items() if k not in (*PROVENANCE, "provenance_note")}
        write_results("calibration", res, markdown(res))
        print(markdown(res))
        return
    torch.manual_seed(0)
    x, y = load_image_dataset("fashion-mnist", "train")
    xt, yt = load_image_dataset("fashion-mnist", "test")
    xo, _ = load_image_dataset("mnist", "test", normalize=IMAGE_STATS["fashion-mnist"])
    model, map_s = load_map(x, y)
    rows, timing = [], {"map_train_s": map_s, "map_epochs": MAP_EPOCHS}
    for name, kw in SETTINGS.items():
        t0 = time.perf_counter()
        extra = {}
        if name == "map":
            predict = W.fit_map(model)
        elif name.startswith("laplace"):
            predict, la = W.fit_laplace(model, x, y, **kw)
            extra["prior_precision"] = la.prior_precision
        elif name == "csghmc":
            predict, trace, rate = W.fit_sgmcmc(model, x, y, **kw)
            extra["samples"] = len(trace)
        elif name == "mfvi":
            predict = W.fit_mfvi(model, x, y, **kw)
        else:
            predict = W.fit_vbll(model, x, y, **kw)
        fit_s = time.perf_counter() - t0
        row = {"method": name, **W.classification_metrics(W.predict_probs(predict, xt), yt, W.predict_probs(predict, xo)),
               "fit_s": fit_s, **extra}
        print(json.dumps(row), flush=True)
        rows.append(row)
    timing.update(speed(model, x, y))
    res = {"protocol": {"model": "qbayes.models.fashion_cnn (225,034 parameters)", "map_epochs": MAP_EPOCHS,
                        "settings": SETTINGS, "threads": 2, "ood": "MNIST test images", "ece_bins": 15,
                        "machine": machine(), "torch": torch.__version__},
           "rows": rows, "speed": timing}
    write_results("calibration", res, markdown(res))
    print(markdown(res))


def markdown(res: dict) -> str:
    s = res["speed"]
    lines = ["# Fashion-MNIST CNN: calibration and OOD detection", "", __doc__.split("Speed")[0].split("Protocol:")[1].strip(), "",
             "| method | accuracy | NLL | ECE | Brier | OOD AUROC (MNIST) | fit (s) |", "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['method']} | {r['acc']:.4f} | {r['nll']:.4f} | {r['ece']:.4f} | {r['brier']:.4f} | "
                     f"{r['ood_auroc']:.4f} | {r['fit_s']:.1f} |")
    acc = {r["method"]: r for r in res["rows"]}
    mp, ll = acc["map"], acc["laplace_ll_kron"]
    lines += ["", "Acceptance (last-layer K-FAC Laplace lowers ECE below MAP's at equal accuracy): "
              f"ECE {ll['ece']:.4f} vs {mp['ece']:.4f}, accuracy {ll['acc']:.4f} vs {mp['acc']:.4f}: "
              + ("holds." if ll["ece"] < mp["ece"] and abs(ll["acc"] - mp["acc"]) < 0.002 else "does NOT hold.")]
    lines += ["", f"Speed on {res['protocol']['machine']}, torch {res['protocol']['torch']}, {s.get('threads', 2)} threads, "
              f"batch 128; median of {s.get('repeats', 1)} interleaved rounds of {s.get('steps', 30)} steps each:", "",
              "| | steps/s | relative to plain training |", "|---|---|---|",
              f"| plain PyTorch training step (Adam) | {s['plain_steps_per_s']:.2f} | 1.00 |",
              f"| qbayes SGLD step | {s['sgld_steps_per_s']:.2f} | {s['sgld_steps_per_s'] / s['plain_steps_per_s']:.2f} |",
              f"| qbayes SGHMC step | {s['sghmc_steps_per_s']:.2f} | {s['sghmc_steps_per_s'] / s['plain_steps_per_s']:.2f} |",
              "", f"Last-layer K-FAC Laplace fit (curvature over 60k images + prior tuning): {s['laplace_ll_kron_fit_s']:.1f} s "
              "(median of 3), "
              f"against {s['plain_epoch_s']:.1f} s for one epoch of plain training."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
