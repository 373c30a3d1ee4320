"""Golden codes, scales and zero-points the solvers give on the tiny test models.

Made with ``python tests/golden/gptq_codes.py --write``; the numbers equal, bit for bit, what commit
6fb93a5 gave before the adapter / collector / format-registry refactor of issue 12 on the same
machine. ``tests/test_golden_codes.py`` recomputes them with the current code and compares.

Bit-identity is required on a CPU with the arithmetic the file was made with (the same
``torch.backends.cpu.get_cpu_capability()``, architecture and CPU model, recorded in the file: the
file was made on an "AMD EPYC"; an Intel AVX-512 Xeon differs from it in block 1): there no change
is a rounding accident. A CPU with other SIMD widths sums a matmul in another order, so the
block-1 Hessians differ in their last bits, a few codes that sit on a rounding boundary flip, and
the MSE clip search and the act-order column sort (both arg-min/sort over near ties) can then take
another branch. On such a machine only the first block, whose inputs are the embeddings themselves,
must still be bit-identical (it was in every case between the machine that made the first,
hash-only golden file and the AVX-512 machine that made this one).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

HERE = Path(__file__).with_name("gptq_codes.pt")

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


def _tensors(model) -> dict[str, torch.Tensor]:
    """Unpacked codes and zero-points (uint8) and the stored scales of every quantized layer."""
    from qbayes.formats.packing import unpack
    from qbayes.nn.quant_linear import QuantLinear

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            bits, groups = m.spec.bits, m.scales.shape[1]
            out[f"{name}.codes"] = unpack(m.qweight, bits, m.in_features)
            out[f"{name}.scales"] = m.scales.detach().clone()
            if m.qzeros is not None:
                out[f"{name}.zeros"] = unpack(m.qzeros, bits, groups)
    return out


def compute(case: str, **override) -> dict[str, torch.Tensor]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from conftest import VOCAB, tiny_llama, tiny_opt

    from qbayes import QuantSpec, quantize_

    family, method, spec_kw, options = CASES[case]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: threaded reductions would add their own rounding noise
    try:
        model = {"llama": tiny_llama, "opt": tiny_opt}[family]()
        calib = torch.randint(0, VOCAB, (6, 24), generator=torch.Generator().manual_seed(1))
        quantize_(model, QuantSpec(**spec_kw), method, calib, progress=False, **{**options, **override})
    finally:
        torch.set_num_threads(threads)
    return _tensors(model)


def machine() -> str:
    """The arithmetic a CPU run of the solvers depends on: architecture, SIMD capability and the
    CPU model (the BLAS picks its kernels by vendor and model too: an Intel and an AMD AVX-512 CPU
    give different last bits in block 1)."""
    import platform

    name = platform.processor() or "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.machine()}/{torch.backends.cpu.get_cpu_capability()}/{name}"


def first_block(name: str) -> bool:
    return ".layers.0." in name


def differences(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], exact_all: bool = True) -> list[str]:
    """The tensors of ``got`` that are not bit-identical to ``want`` (only the first block's unless
    ``exact_all``); empty when they agree."""
    if sorted(got) != sorted(want):
        return [f"tensor names differ: {sorted(set(got) ^ set(want))[:5]}"]
    return [k for k in sorted(want) if (exact_all or first_block(k))
            and not (got[k].shape == want[k].shape and got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]))]


def load() -> tuple[str, dict[str, dict[str, torch.Tensor]]]:
    """The machine the golden file was made on, and its tensors per case."""
    blob = torch.load(HERE, weights_only=True)
    return blob["machine"], blob["cases"]


if __name__ == "__main__":
    res = {case: compute(case) for case in CASES}
    if "--write" in sys.argv:
        torch.save({"machine": machine(), "cases": res}, HERE)
    for case, t in res.items():
        print(case, len(t), "tensors")
