"""Checks a checkpoint passes before anything is built from it.

* The metadata is covered by a hash (``meta_sha256``, over the canonical JSON of every other
  field), as the weights file is by ``sha256``: an edited ``qbayes.json`` is refused.
* Every field has the type and range the loader needs; every layer entry is a valid spec that
  fits its layer; the model class is a transformers model of a family a qbayes adapter drives;
  config sizes are capped, and the model is first built on the ``meta`` device (no memory) and
  its tensors compared, name by name, in shape and dtype, with the weights file's header.
* After reading: scales are finite and positive, every float tensor finite.

Each refusal is a :class:`qbayes.CheckpointError` that says what is wrong.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math

import torch
from torch import nn

from ..errors import CheckpointError, QBayesError
from ..nn import QuantLinear
from ..spec import QuantSpec

log = logging.getLogger(__name__)

META_HASH = "meta_sha256"
FLOAT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
ST_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
             torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
             torch.bool: "BOOL"}
MAX_DIM = 1 << 24        # in/out features of a layer, any "*_size" or "num_*" config value
MAX_DEPTH = 32           # nesting of the model config
MAX_SCALE = 1e6          # a group step above this means weights beyond ~1e7: no trained network has them


def meta_digest(meta: dict) -> str:
    """sha256 of the canonical JSON of every field except the digest itself."""
    body = {k: v for k, v in meta.items() if k != META_HASH}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _is_int(v) -> bool:
    return type(v) is int


def _type_error(path, field, want):
    return CheckpointError(f"{path}: metadata field {field!r} must be {want}: the checkpoint is corrupt or was "
                           "edited by hand")


def check_metadata(meta, path, fmt: str, versions: tuple[int, ...], verify: bool = True) -> dict:
    """Types, ranges and (with ``verify``) the metadata hash of a parsed ``qbayes.json``."""
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise CheckpointError(f"{path} is not qbayes metadata (format is "
                              f"{meta.get('format') if isinstance(meta, dict) else None!r})")
    version = meta.get("format_version")
    if version not in versions or not _is_int(version):
        raise CheckpointError(f"{path} has format version {version!r}; this qbayes reads versions {list(versions)}")
    if version >= 2 and verify and meta.get(META_HASH) != meta_digest(meta):
        raise CheckpointError(f"{path} does not match its recorded hash ({META_HASH}): the metadata was edited "
                              "or is corrupt; re-save the checkpoint with qbayes")
    if version < 2:
        log.warning("%s is a format-1 checkpoint: its metadata is not covered by a hash; re-save it", path)
    for field, kinds, want in (("model_class", (str, type(None)), "a string"),
                               ("model_config", (dict, type(None)), "an object"),
                               ("method", (str, type(None)), "a string"), ("options", (dict,), "an object"),
                               ("layers", (dict,), "an object"), ("sha256", (str,), "a hex string")):
        if not isinstance(meta.get(field), kinds):
            raise _type_error(path, field, want)
    for field in ("float_dtype", "model_dtype"):
        if field in meta and meta[field] not in FLOAT_DTYPES:
            raise _type_error(path, field, f"one of {list(FLOAT_DTYPES)}")
    extra = meta.get("tensor_dtypes", {})
    if not isinstance(extra, dict) or any(v not in FLOAT_DTYPES for v in extra.values()):
        raise _type_error(path, "tensor_dtypes", "an object of float dtype names")
    if not meta["layers"]:
        raise CheckpointError(f"{path}: the metadata lists no quantized layers")
    for name, info in meta["layers"].items():
        check_layer_entry(name, info, path)
    return meta


def check_layer_entry(name: str, info, path) -> QuantSpec:
    """A layer entry's spec and sizes, as a :class:`QuantSpec`."""
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: layer {name!r} has no spec object")
    for k in ("in_features", "out_features"):
        if not _is_int(info.get(k)) or not 0 < info[k] <= MAX_DIM:
            raise CheckpointError(f"{path}: layer {name!r} has {k} {info.get(k)!r}, not a size in 1..{MAX_DIM}")
    if type(info.get("bias")) is not bool:
        raise CheckpointError(f"{path}: layer {name!r} must say whether it has a bias (true/false)")
    for k in ("bits", "group_size"):
        if not _is_int(info.get(k)):
            raise CheckpointError(f"{path}: layer {name!r} has {k} {info.get(k)!r}, not an integer")
    for k in ("symmetric",):
        if k in info and type(info[k]) is not bool:
            raise CheckpointError(f"{path}: layer {name!r} has {k} {info[k]!r}, not true/false")
    for k in ("clip", "scale_dtype", "format"):
        if k in info and not isinstance(info[k], str):
            raise CheckpointError(f"{path}: layer {name!r} has {k} {info[k]!r}, not a string")
    if "kind" in info:
        if info["kind"] != "conv2d":
            raise CheckpointError(f"{path}: layer {name!r} is of unknown kind {info['kind']!r}")
        _check_conv_entry(name, info, path)
    try:
        spec = QuantSpec.from_dict(info)
        spec.check_layer(info["in_features"], name)
    except (QBayesError, TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: layer {name!r} has an invalid spec ({e})") from None
    return spec


def conv_geometry(conv) -> dict:
    """A convolution's geometry as a checkpoint records it (from a module or a layer entry)."""
    keys = ("in_channels", "kernel_size", "stride", "padding", "dilation", "groups")
    if isinstance(conv, dict):
        return {"kind": conv.get("kind"), **{k: conv.get(k) for k in keys}}
    def pair(v):
        return [0, 0] if v == "valid" else [v, v] if isinstance(v, int) else [int(x) for x in v]
    return {"kind": "conv2d", "in_channels": conv.in_channels, "kernel_size": pair(conv.kernel_size),
            "stride": pair(conv.stride), "padding": pair(conv.padding), "dilation": pair(conv.dilation),
            "groups": conv.groups}


def _check_conv_entry(name: str, info: dict, path) -> None:
    g = conv_geometry(info)
    for k in ("kernel_size", "stride", "padding", "dilation"):
        v = g[k]
        if not (isinstance(v, list) and len(v) == 2 and all(_is_int(x) and 0 <= x <= 64 for x in v)):
            raise CheckpointError(f"{path}: convolution {name!r} has {k} {v!r}, not two integers in 0..64")
    if not all(_is_int(g[k]) and 0 < g[k] <= MAX_DIM for k in ("in_channels", "groups")) \
            or g["in_channels"] % g["groups"] or info["out_features"] % g["groups"] \
            or g["in_channels"] // g["groups"] * g["kernel_size"][0] * g["kernel_size"][1] != info["in_features"]:
        raise CheckpointError(f"{path}: convolution {name!r} has inconsistent channels, groups and kernel size")


def check_config(cfg: dict, n_tensors: int, path, depth: int = 0) -> None:
    """Cap what a config can make the loader allocate or build, before anything is built: no
    layer count above the number of tensors stored, no size above :data:`MAX_DIM`, finite floats."""
    if depth > MAX_DEPTH:
        raise CheckpointError(f"{path}: the model config is nested more than {MAX_DEPTH} deep")
    for k, v in cfg.items():
        if isinstance(v, dict):
            check_config(v, n_tensors, path, depth + 1)
        elif isinstance(v, list):
            if len(v) > MAX_DIM:
                raise CheckpointError(f"{path}: model config field {k!r} is a list of {len(v)} entries")
            for x in v:
                if isinstance(x, (dict, list)):
                    check_config({k: x} if isinstance(x, list) else x, n_tensors, path, depth + 1)
                elif isinstance(x, float) and not math.isfinite(x):
                    raise CheckpointError(f"{path}: model config field {k!r} holds {x}")
        elif isinstance(v, float) and not math.isfinite(v):
            raise CheckpointError(f"{path}: model config field {k!r} is {v}")
        elif _is_int(v):
            key = str(k)
            if "layers" in key and v > n_tensors:
                raise CheckpointError(f"{path}: model config says {k} = {v}, more than the {n_tensors} tensors stored")
            if (key.endswith("_size") or key.startswith("num_") or key.endswith("_dim")) and abs(v) > MAX_DIM:
                raise CheckpointError(f"{path}: model config says {k} = {v}, above the cap of {MAX_DIM}")


def model_class(name, cfg: dict, families, path):
    """The transformers class named by the checkpoint, if it is a model class of a family qbayes
    drives and matches the config's ``model_type``."""
    import transformers

    mtype = cfg.get("model_type")
    if not isinstance(name, str) or not name.isidentifier() or mtype not in families:
        raise CheckpointError(f"{path}: model class {name!r} (model_type {mtype!r}) is not one qbayes loads; "
                              f"supported model types: {sorted(families)}")
    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)
            and getattr(getattr(cls, "config_class", None), "model_type", None) == mtype):
        raise CheckpointError(f"{path}: {name!r} is not a transformers model class for model_type {mtype!r}")
    return cls


def build_model(cls, cfg: dict, path, device: str | None = None) -> nn.Module:
    """``cls`` built from ``cfg`` (on ``device``; ``"meta"`` allocates nothing)."""
    import transformers

    cfg = {k: v for k, v in cfg.items() if k != "quantization_config"}
    try:
        config = transformers.AutoConfig.for_model(**cfg)
        config.use_cache = False
        if device == "meta":
            with torch.device("meta"):
                return cls(config)
        return cls(config).float()
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as e:  # a config transformers cannot build: refuse, naming it
        raise CheckpointError(f"{path}: cannot build a {cls.__name__} from the stored config "
                              f"({type(e).__name__}: {str(e)[:200]})") from None


def check_against_header(model: nn.Module, header: dict, tied, path) -> None:
    """Every tensor the model holds is in the header at its shape (and, for packed layers, its
    dtype); nothing else is there."""
    state = model.state_dict()
    missing = [k for k in state if k not in header and not tied(k)]
    unexpected = [k for k in header if k not in state]
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit its model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    packed = tuple(n + "." for n, m in model.named_modules() if isinstance(m, QuantLinear))
    for k, (dtype, shape) in header.items():
        t = state[k]
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{path}: tensor {k} has shape {shape}, expected {tuple(t.shape)}")
        want = ST_DTYPES.get(t.dtype)
        if k.startswith(packed) or not t.is_floating_point():
            if dtype != want:
                raise CheckpointError(f"{path}: tensor {k} is stored as {dtype}, expected {want}")
        elif dtype not in ("F16", "BF16", "F32"):
            raise CheckpointError(f"{path}: float tensor {k} is stored as {dtype}")


def check_values(tensors: dict, layers: dict, path) -> None:
    """Scales finite and positive; every float tensor finite."""
    for name in layers:
        s = tensors.get(f"{name}.scales")
        if s is not None and not (torch.isfinite(s).all() and (s > 0).all() and (s <= MAX_SCALE).all()):
            raise CheckpointError(f"{path}: layer {name} has scales that are not finite, positive and at most "
                                  f"{MAX_SCALE:g}: the checkpoint is corrupt or forged")
    for k, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"{path}: tensor {k} holds NaN or Inf values")
