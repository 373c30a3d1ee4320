r"""Measurement operators for inverse problems, ``y = A(x) + σ_y n`` with ``n ~ N(0, I)``.

Every operator acts on a batch ``x`` ``(B, *in_shape)`` and has ``forward(x) -> y``
``(B, *out_shape)``, ``measure(x, sigma_y, generator)`` (a simulated noisy measurement) and a
differentiable ``log_likelihood(x, y, sigma_y) -> (B,)``. Linear ones (:class:`LinearOperator`)
add ``matrix()`` (dense ``(m, d)`` on flattened ``x``, float64), ``adjoint(y)`` (``Aᵀ y``),
``pinv(y)`` (the Moore–Penrose pseudo-inverse ``A⁺ y``) and
``solve_gram(v, scale, shift) = (scale·A Aᵀ + shift·I)⁻¹ v``, the ``m × m`` solve of ΠGDM; their
likelihood is Gaussian,

.. math:: \log p(y \mid x) = -\frac{\lVert y - A x\rVert^2}{2σ_y^2} - \frac m2 \log(2πσ_y^2),

which needs ``σ_y > 0``. The generic ``pinv``/``solve_gram`` use a cached SVD of the dense
matrix (fine up to a few thousand values); :class:`Mask` and :class:`Downsample` have closed forms
(``A Aᵀ = I`` and ``A Aᵀ = I / f²``).

* :class:`Linear` — a dense matrix on flattened ``x``.
* :class:`Mask` — inpainting: ``y`` is the observed entries ``x[mask]`` (``(B, m)``);
  ``pinv = adjoint`` puts them back with zeros elsewhere. :func:`box_mask`, :func:`random_mask`
  build masks for ``(C, H, W)`` images.
* :class:`Blur` — per-channel 2-D convolution ("same" size) with ``"zero"`` padding (the image is
  zero outside) or ``"reflect"`` padding (mirrored without repeating the edge, ``torch``'s
  ``"reflect"``); linear either way.
* :class:`Downsample` — ``factor × factor`` average pooling (super-resolution);
  ``pinv`` is nearest-neighbour upsampling (``Aᵀ = upsample / f²``, ``A Aᵀ = I / f²``).
* :class:`Sign` — 1-bit compressed sensing ``y = sign(A x + σ_y n) ∈ {−1, +1}`` with the probit
  likelihood :math:`\log p(y \mid x) = \sum_i \log Φ(y_i (A x)_i / σ_y)`; ``σ_y > 0`` is required
  (for ``σ_y = 0`` the likelihood is an indicator with no gradient).
"""
from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from ..errors import QBayesError


class Operator:
    """A measurement operator on ``x`` ``(B, *in_shape)`` (see the module docstring)."""

    linear = False
    in_shape: tuple | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def out_shape(self) -> tuple:
        if self.in_shape is None:
            raise QBayesError(f"{type(self).__name__} needs its input shape (shape=...) for this")
        return tuple(self.forward(torch.zeros(1, *self.in_shape, dtype=torch.float64)).shape[1:])

    def measure(self, x: torch.Tensor, sigma_y: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """``A(x) + σ_y n``: a simulated measurement of each row of ``x``."""
        y = self.forward(x)
        return y + check_sigma(sigma_y, allow_zero=True) * _randn(y, generator)

    def log_likelihood(self, x: torch.Tensor, y: torch.Tensor, sigma_y: float) -> torch.Tensor:
        raise NotImplementedError

    def check_y(self, y) -> torch.Tensor:
        """``y`` as a float tensor ``(1, *out_shape)``: one measurement shared by every sample."""
        y = torch.as_tensor(y)
        if not y.is_floating_point():
            y = y.to(torch.float64)
        shape = self.out_shape()
        if tuple(y.shape) == shape:
            y = y.unsqueeze(0)
        if tuple(y.shape) != (1, *shape):
            raise QBayesError(f"y has shape {tuple(y.shape)} but {type(self).__name__} measures {shape}")
        if not bool(torch.isfinite(y).all()):
            raise QBayesError("y contains NaN or inf")
        return y


class LinearOperator(Operator):
    """A linear ``A``; subclasses give ``forward`` and ``adjoint`` (and may override the rest)."""

    linear = True

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def log_likelihood(self, x: torch.Tensor, y: torch.Tensor, sigma_y: float) -> torch.Tensor:
        s = check_sigma(sigma_y)
        r = (y - self.forward(x)).flatten(1)
        return -(r * r).sum(1) / (2 * s * s) - r.shape[1] / 2 * math.log(2 * math.pi * s * s)

    def matrix(self) -> torch.Tensor:
        """The dense ``(m, d)`` matrix on flattened ``x``, float64 (built from ``forward``)."""
        if getattr(self, "_matrix", None) is None:
            if self.in_shape is None:
                raise QBayesError(f"{type(self).__name__} needs its input shape (shape=...) for matrix()")
            d = math.prod(self.in_shape)
            eye = torch.eye(d, dtype=torch.float64).reshape(d, *self.in_shape)
            with torch.no_grad():
                self._matrix = self.forward(eye).reshape(d, -1).T.contiguous()
        return self._matrix

    def _svd(self):
        if getattr(self, "_svd_cache", None) is None:
            U, S, Vh = torch.linalg.svd(self.matrix(), full_matrices=False)
            self._svd_cache = (U, S, Vh)
        return self._svd_cache

    def pinv(self, y: torch.Tensor, rcond: float | None = None) -> torch.Tensor:
        """``A⁺ y`` ``(B, *in_shape)``; singular values below ``rcond·s_max`` (default
        ``max(m, d)·ε``, NumPy's) are treated as zero."""
        U, S, Vh = self._svd()
        cut = (max(U.shape[0], Vh.shape[1]) * torch.finfo(torch.float64).eps if rcond is None else rcond) * S.max()
        inv = torch.where(S > cut, 1 / S, torch.zeros_like(S))
        yf = y.reshape(y.shape[0], -1).to(torch.float64)
        x = ((yf @ U) * inv) @ Vh
        return x.to(y.dtype).reshape(y.shape[0], *self.in_shape)

    def solve_gram(self, v: torch.Tensor, scale: float, shift: float) -> torch.Tensor:
        """``(scale·A Aᵀ + shift·I)⁻¹ v`` for ``v`` ``(B, *out_shape)`` (``shift = 0``: the
        pseudo-inverse of ``scale·A Aᵀ``)."""
        U, S, _ = self._svd()
        vf = v.reshape(v.shape[0], -1).to(torch.float64)
        lam = scale * S * S + shift
        inv = torch.where(lam > 0, 1 / lam, torch.zeros_like(lam))
        c = vf @ U
        out = (c * inv) @ U.T
        if shift > 0:
            out = out + (vf - c @ U.T) / shift
        return out.to(v.dtype).reshape(v.shape)


class Linear(LinearOperator):
    """``y = A x`` for a dense ``A`` ``(m, d)`` on flattened ``x`` (``in_shape`` defaults to ``(d,)``)."""

    def __init__(self, A, shape: tuple | None = None):
        A = torch.as_tensor(A, dtype=torch.float64)
        if A.dim() != 2 or not bool(torch.isfinite(A).all()):
            raise QBayesError(f"Linear needs a finite 2-D matrix, got shape {tuple(A.shape)}")
        self.A = A
        self.in_shape = tuple(shape) if shape is not None else (A.shape[1],)
        if math.prod(self.in_shape) != A.shape[1]:
            raise QBayesError(f"shape {self.in_shape} has {math.prod(self.in_shape)} values, A has {A.shape[1]} columns")
        self._matrix = A

    def forward(self, x):
        return _flat(x, self.in_shape) @ self.A.to(x.device, x.dtype).T

    def adjoint(self, y):
        return (y.reshape(y.shape[0], -1) @ self.A.to(y.device, y.dtype)).reshape(y.shape[0], *self.in_shape)


class Mask(LinearOperator):
    """Inpainting: ``y = x[mask]`` ``(B, m)``, ``mask`` a boolean tensor of ``in_shape`` (True:
    observed). ``A Aᵀ = I``, so ``pinv = adjoint`` (zeros where unobserved)."""

    def __init__(self, mask):
        mask = torch.as_tensor(mask).bool()
        if mask.dim() == 0 or not bool(mask.any()):
            raise QBayesError("a Mask needs a boolean tensor with at least one observed (True) entry")
        self.mask, self.in_shape = mask, tuple(mask.shape)
        self.index = mask.flatten().nonzero().flatten()

    def forward(self, x):
        return _flat(x, self.in_shape)[:, self.index.to(x.device)]

    def adjoint(self, y):
        y = y.reshape(y.shape[0], -1)
        out = y.new_zeros(y.shape[0], self.mask.numel())
        out[:, self.index.to(y.device)] = y
        return out.reshape(y.shape[0], *self.in_shape)

    def pinv(self, y, rcond=None):
        return self.adjoint(y)

    def solve_gram(self, v, scale, shift):
        return v / (scale + shift)


class Blur(LinearOperator):
    """Per-channel 2-D convolution of ``x`` ``(B, C, H, W)`` = ``shape`` with ``kernel``
    ``(kh, kw)`` (odd sizes; cross-correlation, as ``torch``), same-size output, ``padding``
    ``"zero"`` or ``"reflect"`` (module docstring). :meth:`gaussian` builds Gaussian deblurring."""

    def __init__(self, kernel, shape: tuple, padding: str = "zero"):
        k = torch.as_tensor(kernel, dtype=torch.float64)
        if k.dim() != 2 or k.shape[0] % 2 == 0 or k.shape[1] % 2 == 0:
            raise QBayesError(f"a blur kernel must be 2-D with odd sizes, got {tuple(k.shape)}")
        if len(shape) != 3:
            raise QBayesError(f"Blur needs shape (C, H, W), got {tuple(shape)}")
        if padding not in ("zero", "reflect"):
            raise QBayesError(f"padding must be 'zero' or 'reflect', got {padding!r}")
        if padding == "reflect" and (k.shape[0] // 2 >= shape[1] or k.shape[1] // 2 >= shape[2]):
            raise QBayesError("reflect padding needs a kernel smaller than twice the image")
        self.kernel, self.in_shape, self.padding = k, tuple(shape), padding
        self._pad = (k.shape[0] // 2, k.shape[1] // 2)

    @classmethod
    def gaussian(cls, sigma: float, shape: tuple, size: int | None = None, padding: str = "zero") -> "Blur":
        """A normalised Gaussian kernel of std ``sigma`` pixels, ``size`` (odd) defaulting to
        ``2·⌈3σ⌉ + 1``."""
        if not sigma > 0:
            raise QBayesError(f"blur sigma must be positive, got {sigma!r}")
        size = size or 2 * math.ceil(3 * sigma) + 1
        u = torch.arange(size, dtype=torch.float64) - size // 2
        g = torch.exp(-u ** 2 / (2 * sigma ** 2))
        k = torch.outer(g, g)
        return cls(k / k.sum(), shape, padding)

    def _weight(self, like):
        C = self.in_shape[0]
        return self.kernel.to(like.device, like.dtype).expand(C, 1, *self.kernel.shape)

    def forward(self, x):
        x = x.reshape(x.shape[0], *self.in_shape)
        w = self._weight(x)
        if self.padding == "zero":
            return F.conv2d(x, w, padding=self._pad, groups=self.in_shape[0])
        ph, pw = self._pad
        return F.conv2d(F.pad(x, (pw, pw, ph, ph), mode="reflect"), w, groups=self.in_shape[0])

    def adjoint(self, y):
        y = y.reshape(y.shape[0], *self.in_shape)
        if self.padding == "zero":
            return F.conv_transpose2d(y, self._weight(y), padding=self._pad, groups=self.in_shape[0])
        with torch.enable_grad():  # the adjoint of pad-then-convolve, by autograd (exact: it is linear)
            x = torch.zeros_like(y, requires_grad=True)
            return torch.autograd.grad(self.forward(x), x, y)[0]


class Downsample(LinearOperator):
    """``factor × factor`` average pooling of ``x`` ``(B, C, H, W)`` (``H``, ``W`` divisible by
    ``factor``). ``A Aᵀ = I/f²``: ``adjoint`` is nearest upsampling divided by ``f²``, ``pinv``
    nearest upsampling."""

    def __init__(self, factor: int = 2, shape: tuple | None = None):
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise QBayesError(f"factor must be a positive int, got {factor!r}")
        if shape is not None and (len(shape) != 3 or shape[1] % factor or shape[2] % factor):
            raise QBayesError(f"Downsample needs shape (C, H, W) with H, W divisible by {factor}, got {tuple(shape)}")
        self.factor, self.in_shape = factor, (tuple(shape) if shape is not None else None)

    def forward(self, x):
        if x.dim() != 4 or x.shape[2] % self.factor or x.shape[3] % self.factor:
            raise QBayesError(f"Downsample needs (B, C, H, W) with H, W divisible by {self.factor}, got {tuple(x.shape)}")
        return F.avg_pool2d(x, self.factor)

    def pinv(self, y, rcond=None):
        return y.repeat_interleave(self.factor, 2).repeat_interleave(self.factor, 3)

    def adjoint(self, y):
        return self.pinv(y) / self.factor ** 2

    def solve_gram(self, v, scale, shift):
        return v / (scale / self.factor ** 2 + shift)


class Sign(Operator):
    """1-bit compressed sensing ``y = sign(A x + σ_y n)`` (``sign(0) = +1``) with the probit
    likelihood of the module docstring; ``A`` ``(m, d)`` on flattened ``x``."""

    def __init__(self, A, shape: tuple | None = None):
        self.lin = Linear(A, shape)
        self.A, self.in_shape = self.lin.A, self.lin.in_shape

    def forward(self, x):
        return _sign(self.lin.forward(x))

    def measure(self, x, sigma_y, generator=None):
        z = self.lin.forward(x)
        return _sign(z + check_sigma(sigma_y, allow_zero=True) * _randn(z, generator))

    def log_likelihood(self, x, y, sigma_y):
        s = check_sigma(sigma_y, what="the probit likelihood of Sign")
        return torch.special.log_ndtr(y * self.lin.forward(x) / s).sum(1)


def box_mask(shape: tuple, size: int | tuple | None = None, top: int | None = None, left: int | None = None) -> torch.Tensor:
    """Box inpainting mask for ``(C, H, W)`` images: True (observed) everywhere but a
    ``size`` box (default ``(H//2, W//2)``, centred unless ``top``/``left`` are given)."""
    C, H, W = shape
    h, w = (size, size) if isinstance(size, int) else (size or (H // 2, W // 2))
    top = (H - h) // 2 if top is None else top
    left = (W - w) // 2 if left is None else left
    if not (0 <= top and top + h <= H and 0 <= left and left + w <= W):
        raise QBayesError(f"box {h}x{w} at ({top}, {left}) does not fit a {H}x{W} image")
    m = torch.ones(shape, dtype=torch.bool)
    m[:, top:top + h, left:left + w] = False
    return m


def random_mask(shape: tuple, missing: float = 0.7, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random-pixel mask for ``(C, H, W)`` images: ``round(missing·H·W)`` pixels (all channels)
    unobserved, chosen uniformly by ``generator`` (default: 70 % missing)."""
    C, H, W = shape
    if not 0 <= missing < 1:
        raise QBayesError(f"missing must be in [0, 1), got {missing!r}")
    drop = torch.randperm(H * W, generator=generator)[: round(missing * H * W)]
    m = torch.ones(H * W, dtype=torch.bool)
    m[drop] = False
    return m.view(1, H, W).expand(C, H, W).clone()


def check_sigma(sigma_y, allow_zero: bool = False, what: str = "a Gaussian likelihood") -> float:
    if isinstance(sigma_y, bool) or not isinstance(sigma_y, (int, float)) or not math.isfinite(sigma_y) or sigma_y < 0:
        raise QBayesError(f"sigma_y must be a finite number >= 0, got {sigma_y!r}")
    if sigma_y == 0 and not allow_zero:
        raise QBayesError(f"{what} needs sigma_y > 0 (got 0): use a small positive sigma_y")
    return float(sigma_y)


def _flat(x: torch.Tensor, shape: tuple) -> torch.Tensor:
    if math.prod(x.shape[1:]) != math.prod(shape):
        raise QBayesError(f"x has rows of shape {tuple(x.shape[1:])}, the operator expects {tuple(shape)}")
    return x.reshape(x.shape[0], -1)


def _sign(z):
    return torch.where(z >= 0, torch.ones_like(z), -torch.ones_like(z))


def _randn(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    dev = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, device=dev, dtype=like.dtype).to(like.device)
