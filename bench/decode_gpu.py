"""Batch-1 decoding on a CUDA GPU: Hugging Face's loop against qbayes's decoder, bf16 and packed W4.

No checkpoint travels to a lent GPU machine, so the model is a Llama with random weights and
the shape given by ``--shape`` (``smollm2``: SmolLM2-135M's; ``1b``: Llama-3.2-1B's). Decode
speed does not depend on the weight values, only on the shapes and the path: the tokens differ
from a trained model's, the work per token does not. Protocol: a 64-token random prompt,
128 new tokens, greedy; ``tokens/s`` = (new tokens - 1) / time after the first token; the
three runs (HF loop bf16, qbayes loop bf16, qbayes loop W4 g64 with Triton kernels) are
interleaved over 3 rounds after one warm-up round (which also tunes the Triton kernels);
reported: medians.

    python bench/decode_gpu.py --shape 1b    # writes bench/results/decode_gpu.{json,md}
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

SHAPES = {
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0, tie_word_embeddings=True),
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, tie_word_embeddings=True),
}


class _Tok:
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="1b", choices=list(SHAPES))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the script (results not written)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device")
    from transformers import LlamaConfig, LlamaForCausalLM

    from qbayes import QuantSpec, quantize_
    from qbayes.generate import generate

    torch.manual_seed(0)
    cfg = LlamaConfig(**SHAPES[args.shape], max_position_embeddings=4096)
    bf16 = LlamaForCausalLM(cfg).to(args.device, torch.bfloat16).eval()
    w4 = copy.deepcopy(bf16)
    quantize_(w4, QuantSpec(bits=4, group_size=64), method="rtn", float_dtype="bfloat16", progress=False)
    prompt = torch.randint(0, cfg.vocab_size, (1, 64), generator=torch.Generator().manual_seed(1))
    runs = {"bf16 [hf]": (bf16, "hf"), "bf16 [qbayes]": (bf16, "qbayes"), "W4 g64 [qbayes]": (w4, "qbayes")}
    speeds = {k: [] for k in runs}
    texts = {}
    for r in range(args.rounds + 1):
        for k, (m, eng) in runs.items():
            g = generate(m, _Tok(), prompt, args.new_tokens, stop_at_eos=False, engine=eng)
            texts[k] = g.text
            if r:  # round 0 warms up (and tunes the Triton kernels)
                speeds[k].append(g.tokens_per_s)
                print(f"{k}: {g.tokens_per_s:.1f} tokens/s", flush=True)
    med = {k: statistics.median(v) for k, v in speeds.items()}
    if args.device != "cuda":
        print(med)
        return
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "shape": args.shape,
           "rows": [{"run": k, "tokens_per_s": med[k], "runs": speeds[k],
                     "speedup_vs_bf16_hf": med[k] / med["bf16 [hf]"]} for k in runs],
           "bf16_same_tokens_both_loops": texts["bf16 [hf]"] == texts["bf16 [qbayes]"]}
    lines = [f"# Batch-1 decoding on {res['device']} ({args.shape} shape, random weights)", "",
             __doc__.split("    python")[0].strip(), "", f"torch {res['torch']}.", "",
             "| run | tokens/s (median) | × bf16 HF loop | runs |", "|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['tokens_per_s']:.1f} | {r['speedup_vs_bf16_hf']:.2f} | "
              + ", ".join(f"{v:.1f}" for v in r["runs"]) + " |" for r in res["rows"]]
    lines += ["", f"bf16 tokens identical in both loops: {res['bf16_same_tokens_both_loops']}."]
    write_results("decode_gpu", res, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
