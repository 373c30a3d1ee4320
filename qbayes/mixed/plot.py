"""PNG plots of sensitivity and of the bits-vs-perplexity Pareto front (matplotlib, Agg)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from .sensitivity import SensitivityTable


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: str | Path) -> Path:
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_sensitivity(table: SensitivityTable, path: str | Path, criterion: str, bits: int = 3,
                     allocation: Mapping[str, int] | None = None) -> Path:
    """Left: bits per layer of ``allocation`` (if given). Right: predicted (``criterion``) vs
    measured loss increase per layer at ``bits`` (log-log where positive)."""
    plt = _plt()
    has_meas = "measured" in table.scores
    fig, axes = plt.subplots(1, 2 if has_meas else 1, figsize=(13 if has_meas else 7, 4.2), squeeze=False)
    ax = axes[0][0]
    if allocation is not None:
        ax.bar(range(len(table.layers)), [allocation[n] for n in table.layers], width=1.0, color="tab:blue")
        ax.set_ylabel("bits")
        ax.set_title(f"bits per layer ({criterion} allocation)")
    else:
        ax.bar(range(len(table.layers)), [table.costs(criterion)[n][bits] for n in table.layers], width=1.0)
        ax.set_yscale("symlog", linthresh=1e-6)
        ax.set_title(f"{criterion}: predicted loss increase at {bits} bits")
    ax.set_xlabel("layer (model order)")
    if has_meas:
        ax = axes[0][1]
        for c in table.scores:
            if c == "measured":
                continue
            xs = [table.costs("measured")[n][bits] for n in table.layers]
            ys = [table.costs(c)[n][bits] for n in table.layers]
            pts = [(x, y) for x, y in zip(xs, ys) if x > 0 and y > 0]
            if pts:
                ax.scatter(*zip(*pts), s=6, label=f"{c} (ρ={table.spearman(c, bits):.2f})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"measured loss increase at {bits} bits")
        ax.set_ylabel("predicted (criterion units)")
        ax.legend(fontsize=7)
        ax.set_title("predicted vs measured, per layer")
    return _save(plt, fig, path)


def plot_pareto(rows: Sequence[Mapping], path: str | Path) -> Path:
    """Average code bits per weight vs perplexity: one series per (criterion, solver)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list] = {}
    for r in rows:
        label = f"uniform {r['method'].upper()}" if r["criterion"] == "uniform" else f"mixed GPTQ ({r['criterion']})"
        series.setdefault(label, []).append((r["avg_bits"], r["ppl"]))
    for label, pts in sorted(series.items()):
        pts.sort()
        ax.plot(*zip(*pts), marker="o", ms=4, label=label, lw=2 if label.startswith("uniform") else 1)
    ax.set_yscale("log")
    from matplotlib.ticker import ScalarFormatter

    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.set_xlabel("average code bits per weight (quantized layers)")
    ax.set_ylabel("perplexity (wikitext-2)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(plt, fig, path)
