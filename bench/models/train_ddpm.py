"""Train the Fashion-MNIST DDPM of :mod:`qbayes.diffusion.zoo`, once.

    python bench/models/train_ddpm.py [--steps 7000]      # the shipped model (~45-60 min, 2 cores)
    python bench/models/train_ddpm.py --smoke              # 20 steps on 256 images, into a temp dir
    python bench/models/train_ddpm.py --time               # forward / train-step cost of the candidates

Fixed seed (0); the 60,000 training images only, scaled to [-1, 1] and padded 28→32 with the
background value (-1); no augmentation (the samples are scored against this distribution).
Ho et al. (2020)'s ε-prediction loss ``E‖ε − ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, t)‖²`` with ``t``
uniform over the linear schedule's ``T = 1000`` steps; AdamW (lr 2e-3, no weight decay) with a
linear warm-up over 300 steps then a cosine decay to 10 %, batch 128, gradient-norm clip 1; an
EMA of the weights (decay ``min(0.999, (1+n)/(10+n))``) is what is saved. 2 CPU threads.

Writes ``qbayes/models/weights/fmnist-ddpm.safetensors`` (EMA weights; metadata: the UNet
config and the schedule as JSON, the seed), ``bench/models/fmnist-ddpm.json`` (config, settings,
loss curve, seconds, commit, command) and ``bench/models/fmnist-ddpm-loss.png`` and
``-samples.png`` (64 deterministic 50-step DDIM samples of the EMA model).

Choice of the UNet (``--time``: batched fp32 forward at batch 128, no grad, and one AdamW
training step at batch 128, 2 threads, on the shared 2-core dev box, 2026-12-07). Columns: a
quiet moment (load ≈ 0.4) / under other jobs' load (≈ 1-3.7; the bigger nets were hit hardest):

======================  ======  ==================  ====================
channels (3 levels)     params  forward ms / image  train s / step
======================  ======  ==================  ====================
(8, 16, 32) + mid attn  0.16 M  0.90 / 1.40         0.40 (smoke) / 0.455
(16, 32, 32) + mid      0.27 M  2.0  / 2.5          - / 4.2
(16, 32, 64) + mid      0.64 M  2.8  / 12-19        - / 5.1-7.5
(32, 64, 64) + mid      1.06 M  - / 23-29           - / 2.1-11
======================  ======  ==================  ====================

All: ``layers_per_block=1``, ``norm_num_groups=8``, no attention in the down/up blocks, one
attention block in the mid block (8×8, head dim 8). The FID protocol needs ≥ 5,000 samples ×
50 DDIM steps = 250,000 image forwards per model, float and quantized: (8, 16, 32) is the one
that stays at ≲ 1 ms per image (≈ 4-6 min per 5,000-sample set), and its 7,000 default steps
take 47-53 min (15 epochs).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from qbayes.data import load_image_dataset  # noqa: E402
from qbayes.diffusion.zoo import (FMNIST_DDPM, FMNIST_DDPM_CONFIG, FMNIST_DDPM_SCHEDULE, build_unet,  # noqa: E402
                                  fmnist_schedule)
from qbayes.models.vision import WEIGHTS  # noqa: E402

SETTINGS = {"steps": 7000, "batch": 128, "lr": 2e-3, "warmup": 300, "final_lr_frac": 0.1, "ema": 0.999,
            "clip": 1.0, "seed": 0}
CANDIDATES = {
    "(8,16,32)+mid-attn": {"block_out_channels": [8, 16, 32]},
    "(16,32,32)+mid-attn": {"block_out_channels": [16, 32, 32]},
    "(16,32,64)+mid-attn": {"block_out_channels": [16, 32, 64]},
    "(16,32,64)": {"block_out_channels": [16, 32, 64], "add_attention": False},
    "(32,64,64)+mid-attn": {"block_out_channels": [32, 64, 64]},
}


def provenance() -> dict:
    try:
        from common import provenance as p
        return p()
    except Exception:  # noqa: BLE001 - bench/common.py absent or git missing: record what we can
        return {"commit": "unknown", "command": " ".join(sys.argv)}


def training_images(n: int | None = None) -> torch.Tensor:
    """The training images ``(n, 1, 32, 32)`` in [-1, 1], padded with the background (-1)."""
    x, _ = load_image_dataset("fashion-mnist", "train", normalize=None)
    x = x[:n] if n else x
    return torch.nn.functional.pad(x * 2 - 1, (2, 2, 2, 2), value=-1.0)


def lr_at(step: int, cfg: dict) -> float:
    """Linear warm-up to ``lr``, then a cosine decay to ``final_lr_frac · lr`` at the last step."""
    if step < cfg["warmup"]:
        return cfg["lr"] * (step + 1) / cfg["warmup"]
    u = (step - cfg["warmup"]) / max(cfg["steps"] - cfg["warmup"], 1)
    f = cfg["final_lr_frac"]
    return cfg["lr"] * (f + (1 - f) * 0.5 * (1 + math.cos(math.pi * min(u, 1.0))))


def train(cfg: dict, weights: Path, record: Path, n_images: int | None = None) -> dict:
    from tqdm import tqdm

    torch.manual_seed(cfg["seed"])
    g = torch.Generator().manual_seed(cfg["seed"])
    x = training_images(n_images)
    schedule = fmnist_schedule()
    abar = schedule.alphas_cumprod.float()
    model, ema = build_unet(), build_unet()
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0)
    losses, perm, pos, t0 = [], torch.randperm(len(x), generator=g), 0, time.perf_counter()
    bar = tqdm(range(cfg["steps"]), desc="DDPM", unit="step")
    for step in bar:
        if pos + cfg["batch"] > len(x):
            perm, pos = torch.randperm(len(x), generator=g), 0
        x0 = x[perm[pos:pos + cfg["batch"]]]
        pos += cfg["batch"]
        t = torch.randint(0, schedule.T, (len(x0),), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        loss = torch.nn.functional.mse_loss(model(a.sqrt() * x0 + (1 - a).sqrt() * eps, t).sample, eps)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["clip"])
        opt.step()
        decay = min(cfg["ema"], (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
            for be, bm in zip(ema.buffers(), model.buffers()):
                be.copy_(bm)
        losses.append(float(loss.detach()))
        if step % 50 == 0 or step == cfg["steps"] - 1:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    seconds = time.perf_counter() - t0
    save(ema.eval(), cfg, losses, seconds, weights, record, len(x))
    return json.loads(record.read_text())


def save(ema, cfg: dict, losses: list, seconds: float, weights: Path, record: Path, n_images: int) -> None:
    from safetensors.torch import save_file

    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(weights),
              metadata={"script": "bench/models/train_ddpm.py", "seed": str(cfg["seed"]),
                        "unet_config": json.dumps(FMNIST_DDPM_CONFIG), "schedule": json.dumps(FMNIST_DDPM_SCHEDULE)})
    window = 100
    smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
              for i in range(len(losses))]
    rec = {**provenance(), "model": FMNIST_DDPM, "unet_config": FMNIST_DDPM_CONFIG, "schedule": FMNIST_DDPM_SCHEDULE,
           "settings": cfg, "train_images": n_images, "final_loss_ema100": smooth[-1],
           "loss_every_100": [round(v, 5) for v in smooth[::100]], "train_s": seconds,
           "s_per_step": seconds / max(len(losses), 1), "threads": torch.get_num_threads(),
           "parameters": sum(p.numel() for p in ema.parameters()), "weights_bytes": weights.stat().st_size}
    record.write_text(json.dumps(rec, indent=1) + "\n")
    plots(ema, losses, smooth, record.with_name(record.stem + "-loss.png"), record.with_name(record.stem + "-samples.png"))
    print(f"{FMNIST_DDPM}: final loss {smooth[-1]:.4f}, {seconds:.0f} s -> {weights}", flush=True)


def plots(ema, losses, smooth, loss_png: Path, samples_png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qbayes.diffusion.sampling import ddim_sample, eps_model_of

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, lw=0.3, alpha=0.4, label="batch")
    ax.plot(smooth, lw=1.2, label="mean of 100")
    ax.set(xlabel="step", ylabel="ε-MSE", yscale="log", title="Fashion-MNIST DDPM training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(loss_png, dpi=120)
    plt.close(fig)
    with torch.no_grad():
        x = ddim_sample(eps_model_of(ema), fmnist_schedule(), torch.randn(64, 1, 32, 32,
                        generator=torch.Generator().manual_seed(0)), steps=50).clamp(-1, 1)
    grid = x[:, 0].reshape(8, 8, 32, 32).permute(0, 2, 1, 3).reshape(256, 256)
    plt.imsave(samples_png, ((grid + 1) / 2).numpy(), cmap="gray", vmin=0, vmax=1)


def time_candidates(batch: int = 128, repeats: int = 3) -> None:
    """Forward ms/image (no grad) and s per training step (fwd+bwd+AdamW) of each candidate."""
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(batch, 1, 32, 32, generator=g), torch.randint(0, 1000, (batch,), generator=g)
    for name, over in CANDIDATES.items():
        m = build_unet({**FMNIST_DDPM_CONFIG, **over})
        with torch.no_grad():
            m.eval()(x, t)
            fwd = min(_timed(lambda: m(x, t)) for _ in range(repeats))
        m.train()
        opt = torch.optim.AdamW(m.parameters(), 1e-4)

        def step():
            loss = m(x, t).sample.pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        step()
        tr = min(_timed(step) for _ in range(repeats))
        print(f"{name:22s} {sum(p.numel() for p in m.parameters()) / 1e6:5.2f} M params  "
              f"forward {fwd / batch * 1e3:6.2f} ms/image  train {tr:6.3f} s/step  "
              f"(7000 steps: {7000 * tr / 60:5.1f} min)", flush=True)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=SETTINGS["steps"], help="optimizer steps (default %(default)s)")
    ap.add_argument("--smoke", action="store_true", help="20 steps on 256 images, written to a temp dir")
    ap.add_argument("--time", action="store_true", help="time the candidate UNets and exit")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.time:
        return time_candidates()
    cfg = {**SETTINGS, "steps": a.steps}
    if a.smoke:
        out = Path(tempfile.mkdtemp(prefix="fmnist-ddpm-smoke-"))
        cfg.update(steps=20, warmup=5)
        rec = train(cfg, out / f"{FMNIST_DDPM}.safetensors", out / f"{FMNIST_DDPM}.json", n_images=256)
        print(f"smoke run in {out}: {rec['s_per_step']:.3f} s/step, final loss {rec['final_loss_ema100']:.4f}")
        return
    train(cfg, WEIGHTS / f"{FMNIST_DDPM}.safetensors", Path(__file__).parent / f"{FMNIST_DDPM}.json")


if __name__ == "__main__":
    main()
