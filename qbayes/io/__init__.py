"""Save and load quantized models: one safetensors file plus JSON metadata.

Layout of a checkpoint folder::

    model.safetensors   packed codes, scales, zero-points, and the float parameters
                        (in the 16-bit dtype chosen at quantization)
    qbayes.json         {"format": "qbayes-quantized", "format_version", the per-layer specs,
                         the model config, the model's dtype, the sha256 of model.safetensors
                         and of every tokenizer file, and meta_sha256 over all of it}
    tokenizer files     when a tokenizer was given

Guarantees:

* **Atomic.** The whole folder is written under a hidden sibling name and swapped in with one
  atomic step (:mod:`.files`); at every instant the path holds the complete old or the complete
  new checkpoint, and a failed save removes what it wrote. A folder holding anything but a
  qbayes checkpoint (another model, other files) is never replaced.
* **Verified on load** before anything is built (:mod:`.validate`): every file regular and
  size-checked, the weights, tokenizer files and metadata against their hashes, every field and
  layer entry typed and in range, the model class a transformers model of a family qbayes
  drives, the model first built on the ``meta`` device and every tensor compared with the
  weights file's header in name, shape and dtype, scales finite and positive.
* **Identical reloads**: the model comes back in the dtype it was quantized in.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..nn import QuantConv2d, QuantLinear, set_module
from ..spec import QuantSpec
from . import activations, files, validate
from .files import check_free_space, check_out_dir, check_out_file
from .validate import FLOAT_DTYPES, meta_digest

log = logging.getLogger(__name__)

FORMAT = "qbayes-quantized"
FORMAT_VERSION = 2
READS_VERSIONS = (1, 2)
WEIGHTS = "model.safetensors"
META = "qbayes.json"
_DTYPE_NAMES = {v: k for k, v in FLOAT_DTYPES.items()}


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


def _float_dtypes(model: nn.Module) -> tuple[str, dict[str, str]]:
    """The dtype of the model's float tensors outside packed layers (non-persistent buffers such as
    rotary tables included: a model cast with ``.to`` has them in its dtype, one built in a dtype may
    not), and the tensors that differ from it."""
    quant_prefixes = tuple(n + "." for n, m in model.named_modules() if isinstance(m, QuantLinear))
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    dtypes = {k: t.dtype for k, t in tensors
              if t.is_floating_point() and not k.startswith(quant_prefixes) and t.dtype in _DTYPE_NAMES}
    counts: dict[torch.dtype, int] = {}
    for d in dtypes.values():
        counts[d] = counts.get(d, 0) + 1
    main = max(counts, key=counts.get) if counts else torch.float32
    return _DTYPE_NAMES[main], {k: _DTYPE_NAMES[d] for k, d in dtypes.items() if d != main}


def save_quantized(model: nn.Module, out_dir: str | Path, tokenizer=None, extra: dict | None = None) -> Path:
    """Write ``model`` (after :func:`qbayes.quantize_`) to ``out_dir`` atomically; returns the folder.

    ``out_dir`` may be new, an empty folder or an earlier qbayes checkpoint (replaced whole); a
    folder holding anything else is refused before anything is written."""
    from safetensors import SafetensorError

    cfg = getattr(model, "qbayes_config", None)
    if cfg is None:
        raise CheckpointError("this model was not quantized by qbayes.quantize_ (it has no qbayes_config)")
    out = Path(out_dir)
    check_out_dir(out, force=True, meta_name=META, fmt=FORMAT, own_files=own_files(out))
    float_dtype = FLOAT_DTYPES[cfg.get("float_dtype", "float16")]
    tensors = _storage_tensors(model, float_dtype)
    model_dtype, tensor_dtypes = _float_dtypes(model)
    layers = {}
    mods = dict(model.named_modules())
    inner = {n + ".packed" for n, m in mods.items() if isinstance(m, QuantConv2d)}  # a conv's packed storage
    for name, m in mods.items():
        if isinstance(m, QuantConv2d):
            layers[name] = {**m.spec.to_dict(), "in_features": m.packed.in_features, "out_features": m.out_channels,
                            "bias": m.packed.bias is not None, **validate.conv_geometry(m)}
        elif isinstance(m, QuantLinear) and name not in inner:
            layers[name] = {**m.spec.to_dict(), "in_features": m.in_features, "out_features": m.out_features,
                            "bias": m.bias is not None}
        else:
            continue
        layers[name].update({k: v for k, v in cfg["layers"].get(name, {}).items()
                             if k not in QuantSpec.__dataclass_fields__ and k not in layers[name]})
    try:
        _write(out, tensors, tokenizer, model, cfg, layers, model_dtype, tensor_dtypes, extra)
    except (OSError, SafetensorError) as e:  # a full disk, a file-size limit, a vanished folder
        raise CheckpointError(f"cannot write the checkpoint to {out} ({e}); nothing was written there and an older "
                              "checkpoint at that path is intact") from e
    return out


def _write(out, tensors, tokenizer, model, cfg, layers, model_dtype, tensor_dtypes, extra) -> None:
    from safetensors.torch import save_file

    with files.atomic_folder(out) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        stored = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file() and p.name != WEIGHTS}
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model_class": type(model).__name__,
            "model_config": model.config.to_dict() if hasattr(model, "config") else None,
            "model_dtype": model_dtype,
            "tensor_dtypes": tensor_dtypes,
            "method": cfg.get("method"),
            "options": cfg.get("options", {}),
            "float_dtype": cfg.get("float_dtype", "float16"),
            "quantize_seconds": cfg.get("quantize_seconds"),
            "layers": layers,
            **({"activations": acts} if (acts := activations.describe(model)) else {}),
            **({"allocation": cfg["allocation"]} if "allocation" in cfg else {}),  # mixed precision: how bits were chosen
            "sha256": _sha256(tmp / WEIGHTS),
            "files": stored,
            **(extra or {}),
        }
        meta = json.loads(json.dumps(meta, default=str))  # what a reader parses is what the digest covers
        meta[validate.META_HASH] = meta_digest(meta)
        (tmp / META).write_text(json.dumps(meta, indent=1))


def own_files(folder: Path) -> frozenset[str]:
    """The files a checkpoint in ``folder`` consists of (what replacing it may delete)."""
    names = {META, WEIGHTS} | files.TOKENIZER_FILES
    try:
        listed = json.loads((folder / META).read_text(encoding="utf-8")).get("files", {})
        names |= set(listed) if isinstance(listed, dict) else set()
    except (OSError, ValueError, AttributeError, RecursionError):
        pass
    return frozenset(names)


def read_metadata(path: str | Path, verify: bool = True) -> dict:
    """The checked ``qbayes.json`` of a checkpoint folder (types, ranges and, with ``verify``, its hash)."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p} is not a folder: a qbayes checkpoint is a folder with {META} and {WEIGHTS}")
    mp = p / META
    if not mp.exists() and not mp.is_symlink():
        raise CheckpointError(f"{p} has no {META}: it is not a qbayes checkpoint (was it saved with save_quantized?)")
    return validate.check_metadata(files.read_json(mp, "metadata"), mp, FORMAT, READS_VERSIONS, verify)


def load_quantized(path: str | Path, device: str | torch.device = "cpu", verify: bool = True,
                   model: nn.Module | None = None):
    """Rebuild a model saved by :func:`save_quantized`. Returns ``(model, tokenizer or None)``.

    A transformers model is rebuilt from the recorded class and config. Any other model (a plain
    ``nn.Module`` such as a CNN) needs ``model``: a float instance of the same architecture,
    whose layers are swapped for the packed ones and whose tensors are overwritten in place.
    ``verify=False`` skips the hashes (not the structural checks).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    files.remove_stale_partials(p)  # left beside it by a save that was killed
    meta = read_metadata(p, verify)
    wp = p / WEIGHTS
    header, _ = files.safetensors_header(wp)
    if verify:
        if _sha256(wp) != meta["sha256"]:
            raise CheckpointError(f"{wp} does not match the hash recorded in {META}: the file is corrupt or truncated")
        _verify_files(p, meta)

    if model is None:
        cfg = meta["model_config"]
        if not cfg:
            raise CheckpointError(f"the checkpoint holds a {meta['model_class']}, which is not a transformers model: "
                                  "pass load_quantized(path, model=<a float instance of that architecture>)")
        from ..models import BLOCK_PATHS, ENCODER_PATHS
        validate.check_config(cfg, len(header), p)
        cls = validate.model_class(meta["model_class"], cfg, set(BLOCK_PATHS) | set(ENCODER_PATHS), p)
        skeleton = validate.build_model(cls, cfg, p, device="meta")
        _swap_layers(skeleton, meta, p, device="meta")
        activations.restore(skeleton, meta.get("activations", {}), header, p, device="meta")
        validate.check_against_header(skeleton, header, lambda k: _is_tied(skeleton, k), p)
        del skeleton
        model = validate.build_model(cls, cfg, p)
    elif type(model).__name__ != meta["model_class"]:
        raise CheckpointError(f"{p} holds a {meta['model_class']}, not a {type(model).__name__}")
    _swap_layers(model, meta, p)
    activations.restore(model, meta.get("activations", {}), header, p)
    validate.check_against_header(model, header, lambda k: _is_tied(model, k), p)
    try:
        tensors = load_file(str(wp), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {wp}: {e}") from e
    validate.check_values(tensors, meta["layers"], p)
    _restore_dtypes(model, meta)
    state = model.state_dict()
    with torch.no_grad():
        for k, t in tensors.items():
            state[k].copy_(t.to(state[k].dtype))
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    model.to(device).eval()
    model.qbayes_config = {k: meta.get(k) for k in ("method", "options", "float_dtype", "quantize_seconds")}
    if "allocation" in meta:
        model.qbayes_config["allocation"] = meta["allocation"]
    model.qbayes_config["layers"] = meta["layers"]
    if "activations" in meta:
        model.qbayes_activations = {"points": sorted(meta["activations"])}
    tok = None
    if (p / "tokenizer.json").exists() or (p / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer
        for name in files.TOKENIZER_FILES:
            if (p / name).exists() or (p / name).is_symlink():
                files.regular_file(p / name, "tokenizer file", files.MAX_META_BYTES)
        tok = AutoTokenizer.from_pretrained(p)
    return model, tok


def _verify_files(p: Path, meta: dict) -> None:
    listed = meta.get("files", {})
    if not isinstance(listed, dict):
        raise CheckpointError(f"{p / META}: field 'files' must map file names to hashes")
    for name, digest in listed.items():
        if not isinstance(name, str) or "/" in name or name in (".", "..") or not isinstance(digest, str):
            raise CheckpointError(f"{p / META}: the file entry {name!r} is malformed")
        files.regular_file(p / name, "tokenizer file", files.MAX_META_BYTES)
        if _sha256(p / name) != digest:
            raise CheckpointError(f"{p / name} does not match the hash recorded in {META}: corrupt or edited")


def _swap_layers(model: nn.Module, meta: dict, p: Path, device=None) -> None:
    mods = dict(model.named_modules())
    for name, info in meta["layers"].items():
        lin = mods.get(name)
        if info.get("kind") == "conv2d":
            spec, g = validate.check_layer_entry(name, info, p), validate.conv_geometry(info)
            if not isinstance(lin, (nn.Conv2d, QuantConv2d)) or validate.conv_geometry(lin) != g:
                raise CheckpointError(f"{p}: layer {name!r} is recorded as a convolution {g} "
                                      "but the model has no such convolution there")
            set_module(model, name, QuantConv2d(g["in_channels"], info["out_features"], tuple(g["kernel_size"]), spec,
                                                tuple(g["stride"]), tuple(g["padding"]), tuple(g["dilation"]),
                                                g["groups"], bias=info["bias"], device=device))
            continue
        if not isinstance(lin, (nn.Linear, QuantLinear)):
            raise CheckpointError(f"{p}: the model has no linear layer {name!r} to hold the packed weights")
        if (lin.in_features, lin.out_features) != (info["in_features"], info["out_features"]):
            raise CheckpointError(f"{p}: layer {name!r} is recorded as {info['in_features']}->{info['out_features']} "
                                  f"but the model's is {lin.in_features}->{lin.out_features}")
        spec = validate.check_layer_entry(name, info, p)
        set_module(model, name, QuantLinear(info["in_features"], info["out_features"], spec, bias=info["bias"],
                                            device=device))


def _restore_dtypes(model: nn.Module, meta: dict) -> None:
    """Cast the float tensors outside packed layers back to the dtypes they had when saved."""
    main = FLOAT_DTYPES[meta.get("model_dtype", "float32")]
    special = {k: FLOAT_DTYPES[v] for k, v in meta.get("tensor_dtypes", {}).items()}
    quant = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    for mname, mod in model.named_modules():
        if mname in quant or any(mname.startswith(q + ".") for q in quant):
            continue
        for attr, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            key = f"{mname}.{attr}" if mname else attr
            if t is None or not t.is_floating_point():
                continue
            want = special.get(key, main)
            if t.dtype != want:
                t.data = t.data.to(want)


def _is_tied(model: nn.Module, key: str) -> bool:
    cfg = getattr(model, "config", None)
    return bool(getattr(cfg, "tie_word_embeddings", False)) and key.endswith("lm_head.weight")


def checkpoint_bytes(path: str | Path) -> int:
    """Bytes of the weights and metadata (tokenizer files excluded)."""
    p = Path(path)
    return sum((p / f).stat().st_size for f in (WEIGHTS, META) if (p / f).exists())


__all__ = ["FORMAT", "FORMAT_VERSION", "META", "WEIGHTS", "check_free_space", "check_out_dir", "check_out_file", "checkpoint_bytes", "meta_digest",
           "load_quantized", "own_files", "read_metadata", "save_quantized"]
