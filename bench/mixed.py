"""Mixed-precision bit allocation of SmolLM2-135M-Instruct: which sensitivity criterion predicts
the measured per-layer loss increase, and what its allocation buys in perplexity.

Protocol: the model, evaluation windows (wikitext-2 test, 40 × 512 tokens) and GPTQ calibration
(ptb valid, 64 × 512 tokens, seed 0) of bench/llm_ptq.py; GPTQ with act-order and damping 0.01,
asymmetric codes in groups of 64 with float16 scales and MSE ranges. Sensitivity set: 4
windows of 256 tokens of ptb valid drawn with seed 1 (disjoint draws from the GPTQ calibration
are not guaranteed; neither touches the evaluation text). Every criterion scores each of the 210
decoder linears at 2, 3, 4 and 8 bits with the round-to-nearest perturbation ΔW; "measured" is
the true increase of the mean next-token loss on the sensitivity set with that one layer
quantized. Allocation: the exact multiple-choice knapsack (scipy milp) over {2, 3, 4, 8} bits
minimising the summed predicted increase with average code bits per weight <= the budget; then
GPTQ with those per-layer bit-widths. Perplexities are of the quantized model in memory (the
checkpoint round trip is bit-identical, tests/test_end_to_end.py).

    python bench/mixed.py       # resumable: finished runs are kept in bench/results/mixed_state.json
"""
from __future__ import annotations

import copy
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, cpu_name, provenance, write_results  # noqa: E402

from qbayes import QuantSpec, quantize_  # noqa: E402
from qbayes.data import CALIB_TEXT, EVAL_TEXT, calibration_windows, data_path, eval_windows, tokenize_file  # noqa: E402
from qbayes.eval import perplexity  # noqa: E402
from qbayes.mixed.plan import mixed_specs, size_summary  # noqa: E402
from qbayes.mixed.sensitivity import CRITERIA, SensitivityTable, sensitivity  # noqa: E402
from qbayes.models import load_causal_lm, smollm2_135m  # noqa: E402

SENS = RESULTS / "mixed_sensitivity.json"
STATE = RESULTS / "mixed_state.json"
SPEC = QuantSpec(bits=4, group_size=64)
BUDGETS = (3.5, 3.0, 4.0)
PREDICTORS = [c for c in CRITERIA if c != "measured"]


def save_table(table: SensitivityTable) -> None:
    """The per-layer sensitivity table, stamped with the commit and command like every result
    (``SensitivityTable.load`` ignores the extra keys)."""
    write_results(SENS.stem, table.to_dict())


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_config(model0, tok_windows, calib, specs: dict, method: str) -> dict:
    model = copy.deepcopy(model0)
    t0 = time.perf_counter()
    quantize_(model, specs, method=method, calib=calib if method == "gptq" else None, progress=False,
              **({"act_order": True} if method == "gptq" else {}))
    q_s = time.perf_counter() - t0
    ppl = perplexity(model, tok_windows, progress=False)
    return {"ppl": ppl, "quantize_s": q_s}


def key_of(method: str, bits: dict) -> str:
    return method + ":" + hashlib.sha256(json.dumps(sorted(bits.items())).encode()).hexdigest()[:16]


def main() -> None:
    torch.set_num_threads(2)
    model0, tok = load_causal_lm(str(smollm2_135m()))
    windows = eval_windows(tokenize_file(data_path(EVAL_TEXT), tok), 512, 40)
    ptb = tokenize_file(data_path(CALIB_TEXT), tok)
    calib = calibration_windows(ptb, 512, 64, seed=0)
    sens_set = list(calibration_windows(ptb, 256, 4, seed=1).split(2))
    if SENS.exists():
        table = SensitivityTable.load(SENS)
        log(f"sensitivity table loaded from {SENS}")
    else:
        t0 = time.perf_counter()
        table = sensitivity(model0, sens_set, criteria=PREDICTORS, spec=SPEC, bits=(2, 3, 4, 8),
                            hutchinson_samples=16, pqi_nodes=4)
        table.info["predictors_s"] = time.perf_counter() - t0
        save_table(table)
        log(f"predictors done in {table.info['predictors_s']:.0f} s: {table.info['seconds']}")
    state = json.loads(STATE.read_text()) if STATE.exists() else {}
    uniform = [("uniform", "gptq", float(b), {n: b for n in table.layers}) for b in (3, 4)]
    first = uniform + [(c, "gptq", 3.5, mixed_specs(table, c, 3.5)[1].bits) for c in PREDICTORS]
    run_all(first, first, table, model0, windows, calib, state)
    measure(table, model0, sens_set)  # resumable, layer chunk by chunk
    configs = list(first)
    configs.append(("measured", "gptq", 3.5, mixed_specs(table, "measured", 3.5)[1].bits))
    for budget in (3.0, 4.0):
        for crit in PREDICTORS + ["measured"]:
            configs.append((crit, "gptq", budget, mixed_specs(table, crit, budget)[1].bits))
    configs += [("uniform", "rtn", float(b), {n: b for n in table.layers}) for b in (2, 3, 4, 8)]
    configs.append(("uniform", "gptq", 2.0, {n: 2 for n in table.layers}))
    run_all(configs, configs, table, model0, windows, calib, state)


def measure(table: SensitivityTable, model0, sens_set, chunk: int = 14) -> None:
    """The measured criterion, chunk by chunk of layers, saved after each chunk."""
    from qbayes.api import select_layers
    from qbayes.mixed.measured import measured_increase
    from qbayes.mixed.sensitivity import rtn_deltas

    done = table.scores.setdefault("measured", {})
    todo = [n for n in table.layers if n not in done]
    layers = select_layers(model0, QuantSpec(**table.spec))
    t0 = time.perf_counter()
    for i in range(0, len(todo), chunk):
        part = {n: layers[n] for n in todo[i:i + chunk]}
        deltas = rtn_deltas(part, QuantSpec(**table.spec), table.bits, progress=False)
        meas = measured_increase(model0, part, sens_set, {n: {b: deltas[b][n] for b in table.bits} for n in part},
                                 progress=False)
        done.update(meas)
        table.info.setdefault("seconds", {})["measured_s"] = table.info["seconds"].get("measured_s", 0) + time.perf_counter() - t0
        t0 = time.perf_counter()
        save_table(table)
        log(f"measured {len(done)}/{len(table.layers)} layers")


def run_all(configs, shown, table, model0, windows, calib, state) -> None:
    for crit, method, budget, bits in configs:
        key = key_of(method, bits)
        if key not in state:
            specs = {n: QuantSpec(**{**table.spec, "bits": b}) for n, b in bits.items()}
            log(f"{method} {crit} {budget}: running")
            res = run_config(model0, windows, calib, specs, method)
            state[key] = {**res, **size_summary(specs, table.shapes), "bits": bits}
            STATE.write_text(json.dumps(state))
            log(f"{method} {crit} {budget}: ppl {res['ppl']:.2f} in {res['quantize_s']:.0f} s")
        write(table, shown, state)


def write(table: SensitivityTable, configs, state) -> None:
    from qbayes.mixed.plot import plot_pareto, plot_sensitivity

    has_meas = len(table.scores.get("measured", {})) == len(table.layers)
    corr = [{"criterion": c, "bits": b, "spearman": table.spearman(c, b)} for c in PREDICTORS for b in (3, 2)] if has_meas else []
    rows = []
    for crit, method, budget, bits in configs:
        r = state.get(key_of(method, bits))
        if r is None:
            continue
        rows.append({"criterion": crit, "method": method, "avg_bits": r["code_bits_per_weight"], "budget": budget,
                     "overhead_bits": r["overhead_bits_per_weight"], "ppl": r["ppl"], "quantize_s": r["quantize_s"],
                     "bits_histogram": {str(b): sum(1 for v in bits.values() if v == b) for b in table.bits}})
    machine = f"{cpu_name()}, 2 threads, torch {torch.__version__}"
    res = {"protocol": {"doc": __doc__.split("    python")[0].strip(), "machine": machine,
                        "sensitivity_seconds": table.info.get("seconds"), "spec": table.spec},
           "correlation": corr, "rows": [r for r in rows if r["method"] == "gptq"], "rtn_rows": [r for r in rows if r["method"] == "rtn"]}
    prov = provenance()
    write_results("mixed", res, provenance_of=prov)  # the numbers first, in case a plot fails
    plot_pareto(rows, RESULTS / "mixed_pareto.png")
    at35 = [r for r in rows if r["method"] == "gptq" and r["budget"] == 3.5 and r["criterion"] in PREDICTORS]
    best = min(at35, key=lambda r: r["ppl"])["criterion"] if at35 else PREDICTORS[0]  # best perplexity at 3.5 bits
    if not has_meas:
        table = SensitivityTable(table.layers, table.sizes, table.shapes, table.bits, table.spec,
                                 {c: v for c, v in table.scores.items() if c != "measured"}, table.info)
    plot_sensitivity(table, RESULTS / "mixed_sensitivity.png", criterion=best, bits=3,
                     allocation=next((b for c, m, bud, b in configs if c == best and bud == 3.5), None))
    write_results("mixed", res, markdown({**prov, **res}), provenance_of=prov)


def markdown(res: dict) -> str:
    L = ["# Mixed-precision bit allocation: SmolLM2-135M-Instruct", "", res["protocol"]["doc"], "",
         f"Machine: {res['protocol']['machine']}. Sensitivity pass timings (s): {res['protocol']['sensitivity_seconds']}.", "",
         f"Commit {res.get('commit', '?')}; command `{res.get('command', '?')}`; {res.get('date', '')}.", "",
         "## Predicted vs measured per-layer loss increase (Spearman over 210 layers)", "",
         "| criterion | 3 bits | 2 bits |", "|---|---|---|"]
    by = {(c["criterion"], c["bits"]): c["spearman"] for c in res["correlation"]}
    for c in dict.fromkeys(c["criterion"] for c in res["correlation"]):
        L.append(f"| {c} | {by[(c, 3)]:.3f} | {by[(c, 2)]:.3f} |")
    L += ["", "## Perplexity (wikitext-2, 40 × 512) at a weight-bit budget", "",
          "| criterion | solver | budget | code bits/weight | + overhead bits/weight | perplexity | layers at 2/3/4/8 bits |",
          "|---|---|---|---|---|---|---|"]
    for r in res["rows"] + res["rtn_rows"]:
        h = r["bits_histogram"]
        L.append(f"| {r['criterion']} | {r['method']} | {r['budget']:.1f} | {r['avg_bits']:.3f} | {r['overhead_bits']:.3f} | "
                 f"{r['ppl']:.2f} | {h.get('2', 0)}/{h.get('3', 0)}/{h.get('4', 0)}/{h.get('8', 0)} |")
    u = {r["budget"]: r["ppl"] for r in res["rows"] if r["criterion"] == "uniform"}
    mixed35 = [r for r in res["rows"] if r["criterion"] != "uniform" and r["budget"] == 3.5]
    if 3.0 in u and 4.0 in u and mixed35:
        interp = (u[3.0] + u[4.0]) / 2
        b = min(mixed35, key=lambda r: r["ppl"])
        L += ["", f"Acceptance: the linear interpolation of uniform GPTQ W3 ({u[3.0]:.2f}) and W4 ({u[4.0]:.2f}) at 3.5 bits "
              f"is {interp:.2f}; the best mixed model at 3.5 bits ({b['criterion']}) reaches {b['ppl']:.2f} "
              f"at {b['avg_bits']:.3f} code bits per weight: " + ("holds." if b["ppl"] < interp and b["avg_bits"] <= 3.5 else "does NOT hold.")]
    L += ["", "Plots: `mixed_pareto.png` (average bits vs perplexity), `mixed_sensitivity.png` (bits per layer; predicted vs measured)."]
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    sys.exit(main())
