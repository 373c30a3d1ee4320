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


ACT_GRANULARITIES = ("per-tensor", "per-token", "per-channel")
#: how a static range is calibrated (see :mod:`qbayes.observers`)
OBSERVERS = ("minmax", "ema", "percentile", "mse", "entropy")
ACT_FORMATS = ("int", "log2", "logsqrt2")


@dataclass(frozen=True)
class ActSpec:
    """How activations (the inputs of a layer, or an attention matmul operand) are quantized.

    Args:
        bits: code width, 2..8.
        granularity: ``"per-tensor"`` (one range), ``"per-token"`` (one range per row: every
            dimension but the last; dynamic only) or ``"per-channel"`` (one range per channel:
            the last dimension of a linear's input, dimension 1 of a convolution's).
        dynamic: ranges computed from each input at run time instead of calibrated once.
        symmetric: zero-point fixed at ``2^(bits-1)`` (signed codes) instead of fitted.
        observer: how a static range is calibrated: ``"minmax"``, ``"ema"`` (moving average of
            per-batch min/max), ``"percentile"``, ``"mse"`` (expected Lp error search) or
            ``"entropy"`` (KL divergence, as in TensorRT); the last three per-tensor only.
        format: ``"int"`` (affine codes) or ``"log2"`` / ``"logsqrt2"`` (logarithmic codes for
            non-negative values such as softmax outputs, per-tensor).
        percentile: the upper percentile kept by the ``"percentile"`` observer.
        norm: the error exponent of the ``"mse"`` observer (2 = mean squared error).
    """

    bits: int = 8
    granularity: str = "per-tensor"
    dynamic: bool = False
    symmetric: bool = False
    observer: str = "minmax"
    format: str = "int"
    percentile: float = 99.99
    norm: float = 2.0

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or not 2 <= self.bits <= 8:
            raise QBayesError(f"unsupported activation bit-width {self.bits!r}: choose an integer from 2 to 8")
        for field, value, choices in (("granularity", self.granularity, ACT_GRANULARITIES),
                                      ("observer", self.observer, OBSERVERS), ("format", self.format, ACT_FORMATS)):
            if value not in choices:
                raise QBayesError(f"unknown activation {field} {value!r}: choose one of {choices}")
        if self.granularity == "per-token" and not self.dynamic:
            raise QBayesError("per-token activation ranges change with every input: use dynamic=True "
                              "(--act-dynamic), or per-tensor / per-channel static ranges")
        if self.dynamic and self.observer != "minmax":
            raise QBayesError(f"dynamic ranges are the min/max of each input; observer {self.observer!r} "
                              "calibrates static ranges: leave observer='minmax' or set dynamic=False")
        if self.observer in ("percentile", "mse", "entropy") and self.granularity != "per-tensor":
            raise QBayesError(f"the {self.observer!r} observer calibrates one range per tensor: use "
                              "granularity='per-tensor' or the 'minmax'/'ema' observer")
        if self.format != "int" and (self.granularity != "per-tensor" or self.symmetric):
            raise QBayesError(f"{self.format} activations take one per-tensor scale and no sign: "
                              "use granularity='per-tensor', symmetric=False")
        if not (isinstance(self.percentile, (int, float)) and 50.0 < self.percentile <= 100.0):
            raise QBayesError(f"percentile must be in (50, 100], got {self.percentile!r}")
        if not (isinstance(self.norm, (int, float)) and 0.5 <= self.norm <= 8.0):
            raise QBayesError(f"the mse observer's norm must be in [0.5, 8], got {self.norm!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ActSpec":
        names = ("bits", "granularity", "dynamic", "symmetric", "observer", "format", "percentile", "norm")
        return cls(**{k: d[k] for k in names if k in d})

    def __str__(self) -> str:
        kind = "dynamic" if self.dynamic else f"static {self.observer}"
        return f"A{self.bits} {self.format} {self.granularity} {kind} {'sym' if self.symmetric else 'asym'}"
