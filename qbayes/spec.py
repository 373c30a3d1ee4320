"""`QuantSpec`: the one small frozen description of a weight format a user passes around."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .errors import QBayesError
from .formats import PER_CHANNEL, PER_TENSOR, Format, get_format

_SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
CLIP_METHODS = ("minmax", "mse")


@dataclass(frozen=True)
class QuantSpec:
    """How weights are quantized.

    Args:
        bits: code width, 2..8.
        group_size: weights sharing one scale/zero-point along the input dimension; ``-1``
            per output channel, ``0`` per tensor.
        symmetric: zero-point fixed at ``2^(bits-1)`` (not stored) instead of fitted.
        clip: how each group's range is chosen: ``"minmax"`` or ``"mse"`` (grid search over
            shrunk ranges, see :mod:`qbayes.ranges`).
        scale_dtype: storage dtype of scales (``"float16"``, ``"bfloat16"``, ``"float32"``).
        format: the number format, a name from :data:`qbayes.formats.FORMATS`: ``"int"``
            (integer affine, the default) or ``"nf4"`` (QLoRA's 4-bit NormalFloat: 4 bits, an
            absmax scale per group and no zero-point, so ``symmetric`` is always true).
    """

    bits: int = 4
    group_size: int = 64
    symmetric: bool = False
    clip: str = "mse"
    scale_dtype: str = "float16"
    format: str = "int"

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or not 2 <= self.bits <= 8:
            raise QBayesError(f"unsupported bit-width {self.bits!r}: choose an integer from 2 to 8")
        fmt = get_format(self.format)
        why = fmt.check(self.bits, self.group_size, self.symmetric)
        if why:
            raise QBayesError(why)
        if not fmt.stores_zero(False) and not self.symmetric:  # no zero-point to fit: symmetric by construction
            object.__setattr__(self, "symmetric", True)
        if not isinstance(self.group_size, int) or self.group_size < PER_CHANNEL:
            raise QBayesError(
                f"invalid group size {self.group_size!r}: use a positive divisor of the input "
                "dimension, -1 (per-channel) or 0 (per-tensor)"
            )
        if self.clip not in CLIP_METHODS:
            raise QBayesError(f"unknown clip method {self.clip!r}: choose one of {CLIP_METHODS}")
        if self.scale_dtype not in _SCALE_DTYPES:
            raise QBayesError(f"unknown scale dtype {self.scale_dtype!r}: choose one of {tuple(_SCALE_DTYPES)}")

    @property
    def fmt(self) -> Format:
        """The :class:`qbayes.formats.Format` object named by :attr:`format`."""
        return get_format(self.format)

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return _SCALE_DTYPES[self.scale_dtype]

    @property
    def granularity(self) -> str:
        if self.group_size == PER_CHANNEL:
            return "per-channel"
        if self.group_size == PER_TENSOR:
            return "per-tensor"
        return f"group-{self.group_size}"

    def check_layer(self, in_features: int, name: str = "layer") -> None:
        """Raise a clear error if this spec cannot quantize a layer with ``in_features`` inputs."""
        g = self.group_size
        if g > 0 and in_features % g:
            valid = [d for d in range(8, in_features + 1, 8) if in_features % d == 0]
            raise QBayesError(
                f"group size {g} does not divide the input dimension {in_features} of {name}; "
                f"valid group sizes are {valid} (or -1 for per-channel)"
            )

    def n_groups(self, in_features: int) -> int:
        if self.group_size == PER_CHANNEL:
            return 1
        if self.group_size == PER_TENSOR:
            raise QBayesError("per-tensor specs have one group for the whole matrix: use n_groups only with per-channel or group specs")
        return in_features // self.group_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSpec":
        known = {k: d[k] for k in ("bits", "group_size", "symmetric", "clip", "scale_dtype", "format") if k in d}
        return cls(**known)

    def __str__(self) -> str:
        if self.format != "int":
            return f"{self.format.upper()} {self.granularity} ({self.clip})"
        kind = "sym" if self.symmetric else "asym"
        return f"W{self.bits} {self.granularity} {kind} ({self.clip})"
