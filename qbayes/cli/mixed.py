"""The mixed-precision parts of the command line: ``qbayes sensitivity`` and the ``--avg-bits``
path of ``qbayes quantize``."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import QBayesError
from ..mixed.sensitivity import CRITERIA
from .common import _group_size, _resolve_model, finite_float, int_at_least

DEFAULT_CRITERION = "posterior"  # best perplexity at 3.5 bits on SmolLM2 (bench/results/mixed.md)


def bit_choices(v: str) -> tuple[int, ...]:
    try:
        bits = tuple(sorted({int(b) for b in v.split(",") if b.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bit choices are comma-separated integers, not {v!r}")
    if not bits or any(not 2 <= b <= 8 for b in bits):
        raise argparse.ArgumentTypeError(f"bit choices must be integers in 2..8, got {v!r}")
    return bits


def add_sensitivity_set_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sens-text", help="text for the sensitivity set (default: the calibration text, ptb valid)")
    p.add_argument("--sens-windows", type=int_at_least(1), default=4, help="windows in the sensitivity set (default 4)")
    p.add_argument("--sens-seqlen", type=int_at_least(2), default=256, help="tokens per sensitivity window (default 256)")
    p.add_argument("--hutchinson-samples", type=int_at_least(1), default=16, help="HAWQ: Hutchinson probes (default 16)")


def add_quantize_args(q: argparse.ArgumentParser) -> None:
    q.add_argument("--avg-bits", type=finite_float(0, above=True), default=None,
                   help="mixed precision: average code bits per weight of the quantized layers (e.g. 3.5)")
    q.add_argument("--allocate", default=DEFAULT_CRITERION, choices=CRITERIA,
                   help=f"sensitivity criterion for --avg-bits (default {DEFAULT_CRITERION})")
    q.add_argument("--bit-choices", type=bit_choices, default=(2, 3, 4, 8), help="candidate bit-widths (default 2,3,4,8)")
    q.add_argument("--sensitivity", help="a sensitivity.json from 'qbayes sensitivity' (skips recomputing it)")
    add_sensitivity_set_args(q)


def add_parser(sub) -> None:
    s = sub.add_parser("sensitivity", help="per-layer sensitivity of a causal LM under every criterion; table, JSON and PNG")
    s.add_argument("model", nargs="?", default="smollm2-135m", help="model folder, hub id or 'smollm2-135m' (default)")
    s.add_argument("--criteria", default=",".join(CRITERIA), help=f"comma-separated, from {','.join(CRITERIA)} (default all)")
    s.add_argument("--bits", type=bit_choices, default=(2, 3, 4, 8), help="bit-widths to score (default 2,3,4,8)")
    s.add_argument("--group-size", type=_group_size, default=64, help="group size of the scored formats (default 64)")
    s.add_argument("--sym", action="store_true", help="symmetric codes")
    s.add_argument("--show-bits", type=int, default=3, help="bit-width shown in the printed table (default 3)")
    s.add_argument("--avg-bits", type=finite_float(0, above=True), default=3.5, help="budget of the allocation drawn in the PNG (default 3.5)")
    s.add_argument("--out", default=None, help="output folder (default ./qbayes-out/sensitivity-<model>)")
    s.add_argument("--threads", type=int_at_least(1), default=None, help="torch threads (default: torch's choice)")
    add_sensitivity_set_args(s)


def sensitivity_set(args, tok):
    from ..data import CALIB_TEXT, calibration_windows, data_path, tokenize_file

    path = Path(args.sens_text) if args.sens_text else data_path(CALIB_TEXT)
    return list(calibration_windows(tokenize_file(path, tok), args.sens_seqlen, args.sens_windows, seed=1).split(2))


def allocate_for(args, model, tok, spec):
    """Sensitivity (loaded or computed for the one criterion needed) -> per-layer specs."""
    from ..mixed.plan import mixed_specs, size_summary
    from ..mixed.sensitivity import SensitivityTable, sensitivity

    if args.sensitivity:
        table = SensitivityTable.load(args.sensitivity)
    else:
        print(f"scoring layer sensitivity ({args.allocate}) on {args.sens_windows} windows of {args.sens_seqlen} tokens")
        table = sensitivity(model, sensitivity_set(args, tok), criteria=(args.allocate,), bits=args.bit_choices,
                            spec=spec, hutchinson_samples=args.hutchinson_samples)
    specs, alloc = mixed_specs(table, args.allocate, args.avg_bits, bits=args.bit_choices)
    sizes = size_summary(specs, table.shapes)
    hist = {b: sum(1 for s in specs.values() if s.bits == b) for b in args.bit_choices}
    print(f"allocation ({args.allocate}, {alloc.solver}): {sizes['code_bits_per_weight']:.3f} code bits per weight "
          f"(budget {args.avg_bits}) + {sizes['overhead_bits_per_weight']:.3f} bits of scales/zero-points; "
          "layers per bit-width " + ", ".join(f"{b}: {n}" for b, n in hist.items()))
    record = {"criterion": args.allocate, "avg_bits_budget": args.avg_bits, "solver": alloc.solver,
              "predicted_loss_increase": alloc.predicted, **sizes}
    return specs, record


def run_sensitivity(args) -> int:
    from .. import QuantSpec
    from ..mixed.plan import mixed_specs
    from ..mixed.plot import plot_sensitivity
    from ..mixed.sensitivity import sensitivity
    from ..models import load_causal_lm

    criteria = tuple(c.strip() for c in args.criteria.split(",") if c.strip())
    bad = set(criteria) - set(CRITERIA)
    if bad or not criteria:
        raise QBayesError(f"unknown criteria {sorted(bad)}: choose from {', '.join(CRITERIA)}")
    if args.show_bits not in args.bits:
        raise QBayesError(f"--show-bits {args.show_bits} is not among --bits {list(args.bits)}")
    spec = QuantSpec(bits=args.bits[0], group_size=args.group_size, symmetric=args.sym)
    path = _resolve_model(args.model)
    model, tok = load_causal_lm(path)
    table = sensitivity(model, sensitivity_set(args, tok), criteria=criteria, bits=args.bits, spec=spec,
                        hutchinson_samples=args.hutchinson_samples)
    out = Path(args.out or Path("qbayes-out") / f"sensitivity-{Path(path).name}")
    table.save(out / "sensitivity.json")
    b = args.show_bits
    print(f"\npredicted loss increase at {b} bits (measured = the true increase, one layer at a time)")
    print("| layer | weights | " + " | ".join(criteria) + " |")
    print("|---|---|" + "---|" * len(criteria))
    for n in table.layers:
        print(f"| {n} | {table.sizes[n]} | " + " | ".join(f"{table.scores[c][n][b]:.3e}" for c in criteria) + " |")
    if "measured" in criteria:
        print("\nSpearman rank correlation with the measured increase:")
        for c in criteria:
            if c != "measured":
                print(f"  {c:10s} " + "  ".join(f"{bb} bits: {table.spearman(c, bb):+.3f}" for bb in table.bits))
    crit = next((c for c in criteria if c != "measured"), criteria[0])
    specs, _ = mixed_specs(table, crit, args.avg_bits)
    png = plot_sensitivity(table, out / "sensitivity.png", criterion=crit, bits=b,
                           allocation={n: s.bits for n, s in specs.items()})
    print(f"\nsaved {out / 'sensitivity.json'} and {png}")
    return 0
