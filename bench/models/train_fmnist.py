"""Train the Fashion-MNIST MobileNetV2-style net and ViT of :mod:`qbayes.models.vision`, once.

    python bench/models/train_fmnist.py [--only fmnist-mobilenet|fmnist-vit]

Fixed seed (0), the 60,000 training images only (the test split is scored once, at the end,
and never used to choose anything), inputs scaled to [0, 1], random-crop augmentation (pad 2),
AdamW with a one-cycle learning rate, 2 CPU threads. Writes
``qbayes/models/weights/<name>.safetensors`` and ``bench/models/<name>.json`` (the settings,
the loss per epoch, the test accuracy, the commit and the wall time).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import provenance  # noqa: E402
from qbayes.data import load_image_dataset  # noqa: E402
from qbayes.models.vision import ARCHITECTURES, WEIGHTS  # noqa: E402

SETTINGS = {
    "fmnist-mobilenet": {"epochs": 6, "lr": 4e-3, "weight_decay": 1e-4, "batch": 128},
    "fmnist-vit": {"epochs": 10, "lr": 2e-3, "weight_decay": 5e-2, "batch": 128},
}


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random 28×28 crops of the images padded by 2 (one shift per image)."""
    pad = nn.functional.pad(x, (2, 2, 2, 2))
    dx, dy = torch.randint(0, 5, (2,), generator=g).tolist()
    return pad[:, :, dy:dy + 28, dx:dx + 28]


def train(name: str) -> dict:
    cfg = SETTINGS[name]
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = load_image_dataset("fashion-mnist", "train", normalize=None)
    model = ARCHITECTURES[name]()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    steps = cfg["epochs"] * (len(x) // cfg["batch"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["lr"], total_steps=steps)
    losses, t0 = [], time.perf_counter()
    for epoch in range(cfg["epochs"]):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        total = 0.0
        for i in range(len(x) // cfg["batch"]):
            idx = perm[i * cfg["batch"]:(i + 1) * cfg["batch"]]
            loss = nn.functional.cross_entropy(model(_augment(x[idx], g)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss)
        losses.append(total / (len(x) // cfg["batch"]))
        print(f"{name} epoch {epoch + 1}/{cfg['epochs']}: train loss {losses[-1]:.4f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    model.eval()
    xt, yt = load_image_dataset("fashion-mnist", "test", normalize=None)
    with torch.no_grad():
        acc = float(torch.cat([model(b).argmax(1) for b in xt.split(1000)]).eq(yt).float().mean())
    from safetensors.torch import save_file

    WEIGHTS.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(WEIGHTS / f"{name}.safetensors"),
              metadata={"script": "bench/models/train_fmnist.py", "seed": "0"})
    rec = {**provenance(), "model": name, "settings": cfg, "train_loss": losses, "test_top1": acc,
           "train_s": time.perf_counter() - t0, "threads": torch.get_num_threads(),
           "parameters": sum(p.numel() for p in model.parameters())}
    (Path(__file__).parent / f"{name}.json").write_text(json.dumps(rec, indent=1) + "\n")
    print(f"{name}: test top-1 {acc:.4f}", flush=True)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=sorted(SETTINGS))
    a = ap.parse_args()
    torch.set_num_threads(2)
    for name in [a.only] if a.only else sorted(SETTINGS):
        train(name)


if __name__ == "__main__":
    main()
