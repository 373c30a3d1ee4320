"""``qbayes`` command line: thin argument parsing over the library.

    qbayes quantize            # the embedded default: SmolLM2-135M-Instruct, W4 g64 asym GPTQ
    qbayes quantize --model DIR --bits 3 --group-size 64 --method gptq --act-order --out DIR
    qbayes eval DIR            # perplexity of a saved quantized model
    qbayes quantize --avg-bits 3.5 --allocate posterior   # mixed precision under a size budget
    qbayes sensitivity         # per-layer sensitivity table, JSON and PNG
    qbayes uq --method map,laplace-ll   # posteriors of a Fashion-MNIST CNN: accuracy, NLL, ECE, Brier, OOD AUROC

The commands live in this package, one module per family, all called from :mod:`.app`:
:mod:`.common` (argument types, model and text helpers), :mod:`.quantize`, :mod:`.mixed`
(``sensitivity`` and ``quantize --avg-bits``), :mod:`.evaluate` (``eval``, ``generate``),
:mod:`.export`, :mod:`.bench` (``bench-kernels``) and :mod:`.uq`.
"""
from .app import build_parser, main

__all__ = ["build_parser", "main"]
