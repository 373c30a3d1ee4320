"""The batch-1 packed GEMV on its own, for Nsight Compute (``bench/gpu_session.sh`` step 5).

``--tune`` quantizes a random 4096×14336 weight (4-bit, group 64, asymmetric), lets qbayes's
tuner pick the launch configuration, prints each kernel kind's fastest time (do_bench, µs) and,
on its last line, the chosen configuration as JSON. ``--config JSON`` runs that configuration
three times, for ``ncu --launch-skip 2 --launch-count 1``.
"""
from __future__ import annotations

import argparse
import json

import torch


def _layer(K=4096, N=14336, bits=4):
    from qbayes.algorithms.rtn import rtn
    from qbayes.nn import QuantLinear
    from qbayes.spec import QuantSpec

    w = torch.randn(N, K, generator=torch.Generator().manual_seed(0)) * K ** -0.5
    spec = QuantSpec(bits=bits, group_size=64, clip="minmax")
    return QuantLinear.from_quantized(rtn(w, None, spec), spec).cuda()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--config")
    ap.add_argument("--bits", type=int, default=4)
    args = ap.parse_args()
    from qbayes.kernels import triton_kernels as tk

    q = _layer(bits=args.bits)
    x = torch.randn(1, q.in_features, device="cuda", dtype=torch.bfloat16)
    call = dict(qweight=q.qweight, scales=q.scales, qzeros=q.qzeros, bias=None, bits=q.spec.bits,
                in_features=q.in_features, group_cols=q.group_cols)
    if args.tune:
        tk.qlinear(x, **call)
        key, cfg = next(iter(tk.tuned_configs().items()))
        print(json.dumps(tk.fastest_by_kind(key)))
        print(json.dumps(cfg.__dict__))
        return
    cfg = tk.Config(**json.loads(args.config))
    for _ in range(3):
        tk.qlinear(x, **call, config=cfg)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
