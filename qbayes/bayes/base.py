"""Functional building blocks shared by every posterior method.

A method is ``build(log_posterior, **hyperparameters) -> Transform(init, update)``, in the style
of the `posteriors` library:

* ``log_posterior(params, batch) -> (value, aux)`` is the (mini-batch estimate of the) log
  posterior of a parameter dict, e.g. built with :func:`model_log_posterior`;
* ``init(params) -> State`` and ``update(state, batch, inplace=False) -> State``. The functional
  update returns a new state and leaves its input untouched; ``inplace=True`` writes into the
  state's tensors and returns the same object. Both give the same numbers.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from ..errors import QBayesError

Params = dict[str, torch.Tensor]
LogPosterior = Callable[[Params, Any], tuple[torch.Tensor, Any]]


@dataclass
class State:
    """Everything a method carries between steps. ``extras`` holds method-specific tensors
    (momenta, preconditioners, a guiding variable, ...), ``aux`` the last ``log_posterior`` aux."""

    params: Params
    log_posterior: torch.Tensor
    step: int = 0
    extras: dict[str, Any] = field(default_factory=dict)
    aux: Any = None


class Transform(NamedTuple):
    init: Callable[..., State]
    update: Callable[..., State]


def value_and_grad(log_posterior: LogPosterior, params: Params, batch) -> tuple[torch.Tensor, Params, Any]:
    """``(log_posterior(params, batch), its gradient with respect to params, aux)``."""
    def f(p, b):
        value, aux = log_posterior(p, b)
        return value, (() if aux is None else aux)  # torch.func's aux must be a pytree of tensors

    grads, (value, aux) = torch.func.grad_and_value(f, has_aux=True)(params, batch)
    return value.detach(), grads, (None if aux == () else aux)


def scheduled(x: float | Callable[[int], float], step: int) -> float:
    """A hyperparameter given as a constant or as a function of the step."""
    return float(x(step)) if callable(x) else float(x)


def commit(state: State, inplace: bool, params: Params, **fields) -> State:
    """The next state: written into ``state`` (``inplace``) or as a new object."""
    if not inplace:
        return replace(state, params=params, **fields)
    for k, v in params.items():
        state.params[k].copy_(v)
    for name, value in fields.items():
        if name == "extras":
            for k, v in value.items():
                state.extras[k] = _write_into(state.extras.get(k), v)
        else:
            setattr(state, name, value)
    return state


def _write_into(old, new):
    """``new`` written into the tensors of ``old`` where shapes allow (recursively through dicts)."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k, v in new.items():
            old[k] = _write_into(old.get(k), v)
        return old
    if isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor) and old.shape == new.shape:
        return old.copy_(new)
    return new


def model_log_posterior(
    model: nn.Module,
    likelihood: str,
    num_data: int,
    prior_precision: float = 1.0,
    noise_std: float | torch.Tensor = 1.0,
    temperature: float = 1.0,
) -> LogPosterior:
    r"""The log posterior of a network's parameters for mini-batches ``(x, y)``.

    .. math:: \log p(\theta \mid D) \approx \frac{N}{B} \sum_{i \in B} \log p(y_i \mid f_\theta(x_i))
              - \frac{\lambda}{2}\|\theta\|^2

    ``likelihood`` is ``"classification"`` (categorical on logits) or ``"regression"``
    (Gaussian with ``noise_std``). ``temperature`` divides the likelihood (cold posterior < 1).
    Returns ``(value, output)``.
    """
    if likelihood not in ("classification", "regression"):
        raise QBayesError(f"likelihood must be 'classification' or 'regression', not {likelihood!r}")

    def log_post(params: Params, batch) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        out = torch.func.functional_call(model, params, (x,))
        if likelihood == "classification":
            ll = -nn.functional.cross_entropy(out, y, reduction="sum")
        else:
            var = torch.as_tensor(noise_std, dtype=out.dtype) ** 2
            r = out.reshape(y.shape) - y
            ll = -0.5 * (r**2 / var + torch.log(2 * torch.pi * var)).sum()
        prior = -0.5 * prior_precision * sum((p**2).sum() for p in params.values())
        return ll * (num_data / y.shape[0]) / temperature + prior, out

    return log_post
