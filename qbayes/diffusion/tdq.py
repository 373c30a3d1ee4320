r"""TDQ, temporal dynamic quantization (So et al. 2023, "Temporal Dynamic Quantization for Diffusion
Models", NeurIPS): an activation quantizer whose range is a function of the timestep, produced by
a small network from a time embedding, instead of one static range for all timesteps.

:class:`TimestepActQuant` observes, per distinct timestep, the range its spec's observer picks
(min-max, MSE, percentile, ...) and at :meth:`~TimestepActQuant.freeze` fits an MLP

.. math:: (\ell(t), h(t)) = ρ \cdot W_2\,\mathrm{SiLU}(W_1 φ(t) + b_1) + b_2,\qquad
          φ(t) = \bigl(u, \sin(πku), \cos(πku)\bigr)_{k=1..K},\ u = t / T,

to those per-timestep ranges (least squares in units of ``ρ``, the largest range magnitude seen;
Adam, full batch, seeded); the step size and zero-point of a row at timestep ``t`` are the integer
format's for ``[ℓ(t), h(t)]``. The paper trains the network end to end with the task loss (QAT or
PTQ reconstruction); here it is fitted to the calibrated per-timestep ranges (the paper's
initialisation), which is post-training and data-only. It generalises to timesteps not
calibrated (another number of sampling steps). The network is raw parameters, not ``nn.Linear``
modules, so no layer selection ever mistakes it for a layer to quantize.

The timestep comes from a :class:`TimestepClock`: a forward pre-hook on the UNet that records the
``t`` of the call in progress, one per image.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import CalibrationError, QBayesError
from ..formats import fake_quantize, params_from_range
from ..observers import make_observer
from ..spec import ActSpec


class TimestepClock:
    """The timesteps ``(B,)`` of the UNet forward in progress (set by :meth:`attach`'s hook)."""

    def __init__(self):
        self.t: torch.Tensor | None = None
        self.handle = None

    def attach(self, unet: nn.Module) -> "TimestepClock":
        self.handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def detach(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def _hook(self, module, args, kwargs):
        x = args[0] if args else kwargs.get("sample")
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        if x is None or t is None:
            raise QBayesError("TimestepClock: the UNet was called without (sample, timestep)")
        t = torch.as_tensor(t, device=x.device).long().flatten()
        self.t = t.expand(x.shape[0]) if t.numel() == 1 else t

    def now(self, rows: int) -> torch.Tensor:
        if self.t is None:
            raise QBayesError("a timestep-dependent quantizer ran outside a UNet forward (no timestep recorded)")
        if self.t.numel() != rows:
            raise QBayesError(f"the UNet call has {self.t.numel()} timesteps but this activation has {rows} rows")
        return self.t


class TimestepActQuant(nn.Module):
    """TDQ quantizer of one activation (module docstring). ``spec``: a static, per-tensor integer
    :class:`~qbayes.spec.ActSpec`; ``T``: the schedule's length; ``harmonics`` ``K``; ``hidden``
    the MLP width; ``fit_steps``, ``seed``: the fit."""

    def __init__(self, spec: ActSpec, clock: TimestepClock, T: int = 1000, harmonics: int = 8, hidden: int = 32,
                 fit_steps: int = 1500, seed: int = 0):
        super().__init__()
        if not isinstance(spec, ActSpec) or spec.dynamic or spec.format != "int" or spec.granularity != "per-tensor":
            raise QBayesError(f"TDQ predicts one static integer range per timestep: give a static per-tensor int "
                              f"ActSpec, got {spec}")
        self.spec, self.clock, self.T = spec, clock, int(T)
        self.harmonics, self.hidden, self.fit_steps, self.seed = int(harmonics), int(hidden), int(fit_steps), int(seed)
        self._observers: dict[int, object] | None = {}
        self._device = torch.device("cpu")
        self.fit_error: float | None = None
        for name in ("w1", "b1", "w2", "b2", "rho"):
            self.register_buffer(name, None)

    @property
    def calibrated(self) -> bool:
        return self.w1 is not None

    def features(self, t: torch.Tensor) -> torch.Tensor:
        u = (t.double() / self.T).unsqueeze(1)
        k = torch.arange(1, self.harmonics + 1, dtype=torch.float64, device=t.device) * math.pi
        return torch.cat([u, torch.sin(k * u), torch.cos(k * u)], 1).float()

    def ranges(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ℓ(t), h(t))`` for timesteps ``t`` ``(B,)``."""
        if not self.calibrated:
            raise QBayesError("this TDQ quantizer is not calibrated: observe calibration batches and call freeze()")
        o = self._net(self.features(t), self.w1, self.b1, self.w2, self.b2) * self.rho
        return o[:, 0], o[:, 1]

    @staticmethod
    def _net(f, w1, b1, w2, b2):
        return F.linear(F.silu(F.linear(f, w1, b1)), w2, b2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.clock.now(x.shape[0])
        if not self.calibrated:
            xd, self._device = x.detach(), x.device
            for v in torch.unique(t).tolist():
                obs = self._observers.setdefault(int(v), make_observer(self.spec))
                obs.update(xd[t == v])
            return x
        lo, hi = self.ranges(t)
        s, z = params_from_range(lo, hi, self.spec.bits, self.spec.symmetric, None)
        shape = (-1,) + (1,) * (x.dim() - 1)
        q = fake_quantize(x.detach().float(), s.view(shape), z.view(shape), self.spec.bits)
        return x + (q.to(x.dtype) - x).detach()

    def freeze(self) -> None:
        """Fit the range network to the per-timestep ranges observed (raises if none were)."""
        if self.calibrated:
            return
        if not self._observers:
            raise CalibrationError("this TDQ quantizer saw no calibration data")
        ts = sorted(self._observers)
        target = torch.tensor([[float(v) for v in self._observers[k].range()] for k in ts], dtype=torch.float32)
        rho = target.abs().max().clamp(min=1e-12)
        f, y = self.features(torch.tensor(ts)), target / rho
        g = torch.Generator().manual_seed(self.seed)
        d = f.shape[1]
        params = [torch.randn(self.hidden, d, generator=g) / math.sqrt(d), torch.zeros(self.hidden),
                  torch.randn(2, self.hidden, generator=g) / math.sqrt(self.hidden), y.mean(0)]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=1e-2)
        with torch.enable_grad():
            for _ in range(self.fit_steps):
                loss = (self._net(f, *params) - y).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
        dev = self._device
        self.w1, self.b1, self.w2, self.b2 = (p.detach().to(dev) for p in params)
        self.rho = rho.to(dev)
        self.fit_error = float(((self._net(f, *params) - y).abs().max() * rho).detach())
        self._observers = None

    def extra_repr(self) -> str:
        return f"{self.spec}, T={self.T}, harmonics={self.harmonics}, hidden={self.hidden}, calibrated={self.calibrated}"
