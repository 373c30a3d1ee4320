"""GPU check of the quantization path (run on a lent GPU machine; CPU-only machines skip it).

1. The tiny-model end-to-end tests on CUDA (quantize -> save -> load -> identical logits).
2. GPTQ wall time on a SmolLM2-shaped Llama (30 blocks, hidden 576, random weights; the real
   checkpoint cannot travel to the GPU machine) with the calibration shape of the protocol
   (64 windows of 512 tokens), W4 g64 asymmetric, act-order; save/load round trip on the GPU.

Writes a JSON summary, stamped with the commit and command, to the path given (default
bench/results/gpu_check.json).

    python bench/gpu_check.py          # writes bench/results/gpu_check.json
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, provenance, write_results  # noqa: E402


def main(out: str) -> None:
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_end_to_end.py"],
                       capture_output=True, text=True, env={**__import__("os").environ, "QBAYES_TEST_DEVICE": "cuda"})
    res["cuda_end_to_end_tests"] = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-500:]

    from transformers import LlamaConfig, LlamaForCausalLM

    from qbayes import QuantSpec, load_quantized, quantize_, save_quantized

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, use_cache=False)
    model = LlamaForCausalLM(cfg).cuda().eval()
    calib = torch.randint(0, 49152, (64, 512), generator=torch.Generator().manual_seed(0))
    x = calib[:2, :128].cuda()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    quantize_(model, QuantSpec(4, 64), "gptq", calib, progress=False)
    torch.cuda.synchronize()
    res["gptq_w4g64_smollm2_shape_s"] = time.perf_counter() - t0
    res["peak_cuda_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    with torch.no_grad():
        a = model(input_ids=x).logits
    with tempfile.TemporaryDirectory() as d:
        save_quantized(model, d)
        loaded, _ = load_quantized(d, device="cuda")
        with torch.no_grad():
            b = loaded(input_ids=x).logits
    res["reload_logits_identical"] = bool(torch.equal(a, b))
    if Path(out).resolve() == (RESULTS / "gpu_check.json").resolve():
        res = json.loads(write_results("gpu_check", res).read_text())
    else:
        res = {**provenance(), **res}
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(RESULTS / "gpu_check.json"))
