"""``qbayes uq``: posteriors of a Fashion-MNIST CNN and their uncertainty metrics."""
from __future__ import annotations

import time

from ..errors import QBayesError

UQ_METHODS = ("map", "laplace-ll", "laplace-diag", "csghmc", "mfvi", "vbll")


def _uq(args) -> int:
    import torch

    from ..bayes import workflows as W
    from ..data import IMAGE_STATS, load_image_dataset
    from ..models import fashion_cnn

    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    bad = [m for m in methods if m not in UQ_METHODS]
    if bad or not methods:
        raise QBayesError(f"unknown method(s) {bad}: choose from {', '.join(UQ_METHODS)}")
    torch.manual_seed(args.seed)
    x, y = load_image_dataset("fashion-mnist", "train")
    xt, yt = load_image_dataset("fashion-mnist", "test")
    xo, _ = load_image_dataset("mnist", "test", normalize=IMAGE_STATS["fashion-mnist"])
    if args.train_subset:
        x, y = x[: args.train_subset], y[: args.train_subset]
    if args.test_subset:
        xt, yt, xo = xt[: args.test_subset], yt[: args.test_subset], xo[: args.test_subset]
    print(f"training the MAP CNN on {len(x)} Fashion-MNIST images for {args.epochs} epoch(s)")
    model = W.train_map(fashion_cnn(), x, y, epochs=args.epochs, seed=args.seed)
    fits = {
        "map": lambda: W.fit_map(model),
        "laplace-ll": lambda: W.fit_laplace(model, x, y)[0],
        "laplace-diag": lambda: W.fit_laplace(model, x, y, subset="all", structure="diag", fisher="mc",
                                              curvature_subset=min(len(x), 10000), batch_size=32, link_approx="mc")[0],
        "csghmc": lambda: W.fit_sgmcmc(model, x, y, epochs=3, cycles=3, seed=args.seed)[0],
        "mfvi": lambda: W.fit_mfvi(model, x, y, epochs=1, n_samples=8, seed=args.seed),
        "vbll": lambda: W.fit_vbll(model, x, y, epochs=1, seed=args.seed),
    }
    lines = ["| method | accuracy | NLL | ECE | Brier | OOD AUROC (MNIST) | fit (s) |", "|---|---|---|---|---|---|---|"]
    for m in methods:
        t0 = time.perf_counter()
        predict = fits[m]()
        fit_s = time.perf_counter() - t0
        r = W.classification_metrics(W.predict_probs(predict, xt), yt, W.predict_probs(predict, xo))
        lines.append(f"| {m} | {r['acc']:.4f} | {r['nll']:.4f} | {r['ece']:.4f} | {r['brier']:.4f} | "
                     f"{r['ood_auroc']:.4f} | {fit_s:.1f} |")
    print()
    print("\n".join(lines))
    return 0
