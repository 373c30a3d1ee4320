"""Golden hashes of the codes, scales and zero-points the solvers give on the tiny test models.

Made once at commit 6fb93a5 (before the adapter / collector / format-registry refactor of
issue 12) with ``python tests/golden/gptq_codes.py --write``; ``tests/test_golden_codes.py``
recomputes them with the current code and requires them bit-identical, so a refactor that
changes any number is caught (a bug fix that changes one must say so and rewrite this file).
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).with_name("gptq_codes.json")

# name -> (model, method, QuantSpec kwargs, solver options)
CASES = {
    "llama-gptq-w4g32-asym-mse-actorder": ("llama", "gptq", dict(bits=4, group_size=32), {"act_order": True}),
    "llama-gptq-w3g16-sym-minmax": ("llama", "gptq", dict(bits=3, group_size=16, symmetric=True, clip="minmax"),
                                    {"act_order": False}),
    "llama-gptq-w4-perchannel": ("llama", "gptq", dict(bits=4, group_size=-1), {"act_order": True}),
    "llama-gptq-w2g32-static": ("llama", "gptq", dict(bits=2, group_size=32), {"act_order": False, "damp": 0.1}),
    "llama-rtn-w4g32": ("llama", "rtn", dict(bits=4, group_size=32), {}),
    "opt-gptq-w4g32-asym-mse-actorder": ("opt", "gptq", dict(bits=4, group_size=32), {"act_order": True}),
    "opt-gptq-w8-perchannel-sym": ("opt", "gptq", dict(bits=8, group_size=-1, symmetric=True), {"act_order": False}),
}


def _digest(model) -> dict[str, str]:
    out = {}
    for name, buf in sorted(model.state_dict().items()):
        if any(name.endswith(s) for s in (".qweight", ".scales", ".qzeros")):
            t = buf.detach().cpu().contiguous()
            out[name] = hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
    return out


def compute(case: str) -> dict[str, str]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from conftest import VOCAB, tiny_llama, tiny_opt

    from qbayes import QuantSpec, quantize_

    family, method, spec_kw, options = CASES[case]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # threaded reductions round differently: the hashes are for one thread
    try:
        model = {"llama": tiny_llama, "opt": tiny_opt}[family]()
        calib = torch.randint(0, VOCAB, (6, 24), generator=torch.Generator().manual_seed(1))
        quantize_(model, QuantSpec(**spec_kw), method, calib, progress=False, **options)
    finally:
        torch.set_num_threads(threads)
    return _digest(model)


if __name__ == "__main__":
    res = {case: compute(case) for case in CASES}
    if "--write" in sys.argv:
        HERE.write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
    print(json.dumps(res, indent=1)[:2000])
