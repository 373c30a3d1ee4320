"""Save and load quantized models: one safetensors file plus JSON metadata.

Layout of a checkpoint folder::

    model.safetensors   packed codes, scales, zero-points, and the float parameters
                        (in the 16-bit dtype chosen at quantization)
    qbayes.json         {"format": "qbayes-quantized", "format_version", the per-layer specs,
                         the model config, the sha256 of model.safetensors, ...}
    tokenizer files     when a tokenizer was given

Files are written under temporary names and renamed into place at the end, so a failed save
never leaves a half-written checkpoint behind (nor destroys an older one). Loading checks the
hash, the format and every tensor's presence and shape, and names the problem otherwise.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError
from .nn import QuantLinear, set_module
from .spec import QuantSpec

FORMAT = "qbayes-quantized"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
META = "qbayes.json"
_FLOAT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _storage_tensors(model: nn.Module, float_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Checkpoint tensors: QuantLinear buffers as they are, float tensors cast (losslessly, since
    quantize_ rounded them) to ``float_dtype``; tied tensors stored once."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    quant_prefixes = tuple(n + "." for n, m in model.named_modules() if isinstance(m, QuantLinear))
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        if not name.startswith(quant_prefixes) and t.is_floating_point():
            cast = t.to(float_dtype)
            t = cast if torch.equal(cast.to(t.dtype), t) else t  # keep full precision if it would lose bits
        out[name] = t.detach().contiguous().cpu()
    return out


def save_quantized(model: nn.Module, out_dir: str | Path, tokenizer=None, extra: dict | None = None) -> Path:
    """Write ``model`` (after :func:`qbayes.quantize_`) to ``out_dir``; returns the folder."""
    from safetensors.torch import save_file

    cfg = getattr(model, "qbayes_config", None)
    if cfg is None:
        raise CheckpointError("this model was not quantized by qbayes.quantize_ (it has no qbayes_config)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    float_dtype = _FLOAT_DTYPES[cfg.get("float_dtype", "float16")]
    tensors = _storage_tensors(model, float_dtype)
    layers = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            layers[name] = {**m.spec.to_dict(), "in_features": m.in_features, "out_features": m.out_features,
                            "bias": m.bias is not None, **{k: v for k, v in cfg["layers"].get(name, {}).items()
                                                            if k not in QuantSpec.__dataclass_fields__}}
    tmp_w = out / (WEIGHTS + ".tmp")
    tmp_m = out / (META + ".tmp")
    try:
        save_file(tensors, str(tmp_w), metadata={"format": FORMAT})
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model_class": type(model).__name__,
            "model_config": model.config.to_dict() if hasattr(model, "config") else None,
            "method": cfg.get("method"),
            "options": cfg.get("options", {}),
            "float_dtype": cfg.get("float_dtype", "float16"),
            "quantize_seconds": cfg.get("quantize_seconds"),
            "layers": layers,
            **({"allocation": cfg["allocation"]} if "allocation" in cfg else {}),  # mixed precision: how bits were chosen
            "sha256": _sha256(tmp_w),
            **(extra or {}),
        }
        tmp_m.write_text(json.dumps(meta, indent=1, default=str))
        os.replace(tmp_w, out / WEIGHTS)
        os.replace(tmp_m, out / META)
    finally:
        for t in (tmp_w, tmp_m):
            t.unlink(missing_ok=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def read_metadata(path: str | Path) -> dict:
    """The checked ``qbayes.json`` of a checkpoint folder."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p} is not a folder: a qbayes checkpoint is a folder with {META} and {WEIGHTS}")
    mp = p / META
    if not mp.exists():
        raise CheckpointError(f"{p} has no {META}: it is not a qbayes checkpoint (was it saved with save_quantized?)")
    try:
        meta = json.loads(mp.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{mp} is not valid JSON ({e}): the checkpoint is corrupt") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{mp} is not qbayes metadata (format is {meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{p} has format version {meta.get('format_version')!r}; this qbayes reads version {FORMAT_VERSION}")
    return meta


def load_quantized(path: str | Path, device: str | torch.device = "cpu", verify: bool = True,
                   model: nn.Module | None = None):
    """Rebuild a model saved by :func:`save_quantized`. Returns ``(model, tokenizer or None)``.

    A transformers model is rebuilt from the recorded class and config. Any other model (a plain
    ``nn.Module`` such as a CNN) needs ``model``: a float instance of the same architecture,
    whose layers are swapped for the packed ones and whose tensors are overwritten in place.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    meta = read_metadata(p)
    wp = p / WEIGHTS
    if not wp.exists():
        raise CheckpointError(f"{p} has no {WEIGHTS}")
    if verify and _sha256(wp) != meta.get("sha256"):
        raise CheckpointError(f"{wp} does not match the hash recorded in {META}: the file is corrupt or truncated")
    try:
        tensors = load_file(str(wp), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {wp}: {e}") from e

    if model is None:
        model = _build_model(meta)
    elif type(model).__name__ != meta.get("model_class"):
        raise CheckpointError(f"{p} holds a {meta.get('model_class')}, not a {type(model).__name__}")
    mods = dict(model.named_modules())
    for name, info in meta["layers"].items():
        if name not in mods:
            raise CheckpointError(f"{p}: the model has no layer {name!r} to hold the packed weights")
        spec = QuantSpec.from_dict(info)
        set_module(model, name, QuantLinear(info["in_features"], info["out_features"], spec, bias=info["bias"]))
    state = model.state_dict()
    missing = [k for k in state if k not in tensors and not _is_tied(model, k)]
    unexpected = [k for k in tensors if k not in state]
    if missing or unexpected:
        raise CheckpointError(f"{wp} does not fit its model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for k, t in tensors.items():
            if state[k].shape != t.shape:
                raise CheckpointError(f"{wp}: tensor {k} has shape {tuple(t.shape)}, expected {tuple(state[k].shape)}")
            state[k].copy_(t.to(state[k].dtype))
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    model.to(device).eval()
    model.qbayes_config = {k: meta.get(k) for k in ("method", "options", "float_dtype", "quantize_seconds")}
    if "allocation" in meta:
        model.qbayes_config["allocation"] = meta["allocation"]
    model.qbayes_config["layers"] = meta["layers"]
    tok = None
    if (p / "tokenizer.json").exists() or (p / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(p)
    return model, tok


def _is_tied(model: nn.Module, key: str) -> bool:
    cfg = getattr(model, "config", None)
    return bool(getattr(cfg, "tie_word_embeddings", False)) and key.endswith("lm_head.weight")


def _build_model(meta: dict) -> nn.Module:
    import transformers

    cfg_dict = meta.get("model_config")
    cls_name = meta.get("model_class")
    if not cfg_dict:
        raise CheckpointError(f"the checkpoint holds a {cls_name}, which is not a transformers model: pass "
                              "load_quantized(path, model=<a float instance of that architecture>)")
    if not cls_name or not hasattr(transformers, cls_name):
        raise CheckpointError(f"checkpoint names an unknown model class {cls_name!r}")
    cfg_dict = {k: v for k, v in cfg_dict.items() if k != "quantization_config"}
    config = transformers.AutoConfig.for_model(**cfg_dict)
    config.use_cache = False
    cls = getattr(transformers, cls_name)
    return cls(config).float()


def checkpoint_bytes(path: str | Path) -> int:
    """Bytes of the weights and metadata (tokenizer files excluded)."""
    p = Path(path)
    return sum((p / f).stat().st_size for f in (WEIGHTS, META) if (p / f).exists())
