r"""Image classifiers for the activation-quantization benchmarks, with weights shipped in
``qbayes/models/weights/`` (made by the scripts in ``bench/models/``):

* :func:`cifar10_cnn`: the Keras CIFAR-10 CNN of the ``cifar-10-model==7.4.0`` wheel (six 3×3
  convs, each followed by ReLU then BatchNorm, and three dense layers, the last with a ReLU as
  in the original), ported weight for weight. Input: ``(N, 3, 32, 32)`` raw 0–255 pixels.
* :func:`fmnist_mobilenet`: a MobileNetV2-style net (inverted residuals with depthwise convs,
  BatchNorm, ReLU6) for ``(N, 1, 28, 28)`` Fashion-MNIST images scaled to [0, 1].
* :func:`fmnist_vit`: a small ViT (patch 4, 4 pre-norm blocks, LayerNorm, GELU, softmax
  attention) for the same images. The attention's two matmuls read their operands through
  named ``nn.Identity`` points (``q_point``, ``k_point``, ``probs_point``, ``v_point``) that
  activation quantization replaces by quantizers.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, QBayesError

WEIGHTS = Path(__file__).resolve().parent / "weights"


def cifar10_cnn() -> nn.Sequential:
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3), nn.ReLU(), nn.BatchNorm2d(cout, eps=1e-3)]
    return nn.Sequential(
        *block(3, 64), *block(64, 64), nn.MaxPool2d(2),
        *block(64, 128), *block(128, 128), nn.MaxPool2d(2),
        *block(128, 64), *block(64, 64),
        nn.Flatten(), nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 512), nn.ReLU(), nn.Linear(512, 10), nn.ReLU(),
    )


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1×1 expand, 3×3 depthwise, 1×1 project (linear), residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = [] if expand == 1 else [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
                   nn.ReLU6(), nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


def fmnist_mobilenet(n_classes: int = 10) -> nn.Sequential:
    cfg = [(1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 2), (4, 64, 2, 1)]  # (expand, out, repeats, first stride)
    layers: list[nn.Module] = [nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6()]
    cin = 16
    for t, c, n, s in cfg:
        for i in range(n):
            layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
            cin = c
    layers += [nn.Conv2d(cin, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU6(),
               nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, n_classes)]
    return nn.Sequential(*layers)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.softmax = nn.Softmax(-1)
        self.q_point, self.k_point, self.probs_point, self.v_point = (nn.Identity() for _ in range(4))

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = self.softmax(self.q_point(q * self.scale) @ self.k_point(k).transpose(-2, -1))
        out = self.probs_point(attn) @ self.v_point(v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, image: int = 28, patch: int = 4, dim: int = 64, depth: int = 4, heads: int = 4,
                 mlp: int = 128, n_classes: int = 10, channels: int = 1):
        super().__init__()
        if image % patch:
            raise QBayesError(f"patch size {patch} does not divide the image size {image}")
        self.patch_embed = nn.Conv2d(channels, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, n_classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], 1) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x[:, 0]))


def fmnist_vit(n_classes: int = 10) -> ViT:
    return ViT(n_classes=n_classes)


ARCHITECTURES = {"cifar10-cnn": cifar10_cnn, "fmnist-mobilenet": fmnist_mobilenet, "fmnist-vit": fmnist_vit}


def load_vision(name: str) -> nn.Module:
    """The named pretrained classifier in eval mode, its weights checked against the architecture."""
    if name not in ARCHITECTURES:
        raise QBayesError(f"unknown vision model {name!r}: choose one of {sorted(ARCHITECTURES)}")
    path = WEIGHTS / f"{name}.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: run the script in bench/models/ that makes it")
    from safetensors.torch import load_file

    return load_checked(ARCHITECTURES[name](), load_file(str(path)), f"{path} does not match the {name} architecture")


def load_checked(model: nn.Module, state: dict, mismatch: str) -> nn.Module:
    """``model`` (eval mode) with ``state`` loaded, or a CheckpointError starting ``mismatch`` when a
    tensor is missing, unexpected or of the wrong shape."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a tensor of the wrong shape
        raise CheckpointError(f"{mismatch}: {e}") from None
    if missing or unexpected:
        raise CheckpointError(f"{mismatch} (missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")
    return model.eval()
