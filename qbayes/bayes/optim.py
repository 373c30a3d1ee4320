r"""A functional Adam step (Kingma & Ba 2015) for methods that optimise inside ``update``.

.. math:: m \leftarrow \beta_1 m + (1-\beta_1) g,\quad v \leftarrow \beta_2 v + (1-\beta_2) g^2,\quad
          \theta \leftarrow \theta - \eta\,\frac{m/(1-\beta_1^t)}{\sqrt{v/(1-\beta_2^t)} + \epsilon}
"""
from __future__ import annotations

import torch

Params = dict[str, torch.Tensor]


def adam_init(params: Params) -> dict[str, Params]:
    return {"m": {k: torch.zeros_like(v) for k, v in params.items()},
            "v": {k: torch.zeros_like(v) for k, v in params.items()}}


def adam_step(params: Params, grads: Params, moments: dict[str, Params], step: int, lr: float,
              betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> tuple[Params, dict[str, Params]]:
    """One descent step on ``grads`` (step counts from 0). Returns new params and moments."""
    b1, b2 = betas
    t = step + 1
    m = {k: b1 * moments["m"][k] + (1 - b1) * g for k, g in grads.items()}
    v = {k: b2 * moments["v"][k] + (1 - b2) * g * g for k, g in grads.items()}
    c1, c2 = 1 - b1**t, 1 - b2**t
    new = {k: p - lr * (m[k] / c1) / ((v[k] / c2).sqrt() + eps) for k, p in params.items()}
    return new, {"m": m, "v": v}
