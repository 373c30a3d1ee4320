"""Export a qbayes-quantized Llama-family model to a GGUF file that llama.cpp runs.

Packed layers whose layout *is* a ggml block type (see :mod:`.gguf_blocks`) are written as those
blocks without requantizing: symmetric 4-bit groups of 32 as ``Q4_0`` and symmetric 8-bit groups
of 32 as ``Q8_0`` (bit-exact), asymmetric 4-bit groups of 32 as ``Q4_1`` (exact up to the
float16 rounding of the block minimum ``m = -s z``, whose largest effect is reported). Every
other packed layer is dequantized and stored as the ``fallback`` type, and listed in the
report. Float tensors (embeddings, an untied ``lm_head``) are stored as ``float_type``; norms
as F32.

llama.cpp's Llama graph expects the rows of ``attn_q``/``attn_k`` in the interleaved rotary
order of the original checkpoints, which Hugging Face's layout permutes; the export permutes
those rows back (a pure reordering of whole rows, so block data stays exact).

Tokenizer metadata is copied from a ``template`` GGUF when one is given (e.g. the file the model
was converted from), else built from the Hugging Face ``tokenizer.json`` (byte-level BPE).
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import QBayesError
from ..nn import QuantLinear
from .gguf_blocks import gguf_type_for, to_gguf_blocks

log = logging.getLogger(__name__)

SUPPORTED_FAMILIES = ("llama", "mistral")
FLOAT_TYPES = ("f32", "f16", "q8_0")
_LINEAR_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_NORM_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
# general.file_type for the dominant tensor type (llama.cpp's LLAMA_FTYPE_MOSTLY_*)
_FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7}


def gguf_name(hf_name: str) -> str | None:
    """llama.cpp's tensor name for a Hugging Face Llama parameter name (``None`` if unknown)."""
    parts = hf_name.split(".")
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    if len(parts) >= 5 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        rest, kind = ".".join(parts[3:-1]), parts[-1]
        name = _LINEAR_NAMES.get(rest) or _NORM_NAMES.get(rest)
        if name is not None:
            return f"blk.{parts[2]}.{name}.{kind}"
    return None


def rope_row_order(n_rows: int, n_head: int) -> np.ndarray:
    """Row indices that turn Hugging Face's q/k layout (halves) into ggml's (interleaved pairs)."""
    if n_rows % (2 * n_head):
        raise QBayesError(f"cannot permute {n_rows} rows for {n_head} rotary heads")
    return np.arange(n_rows).reshape(n_head, 2, n_rows // n_head // 2).swapaxes(1, 2).reshape(-1)


def _config_value(cfg, *names, default=None):
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def _check_config(cfg) -> dict:
    family = getattr(cfg, "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        raise QBayesError(f"GGUF export supports the {'/'.join(SUPPORTED_FAMILIES)} families; this model is {family!r}")
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in ("default", None):
        raise QBayesError(f"GGUF export does not write rope scaling {rope_type!r} yet")
    theta = (rope.get("rope_theta") if isinstance(rope, dict) else None) or _config_value(cfg, "rope_theta", default=10000.0)
    if getattr(cfg, "mlp_bias", False):
        raise QBayesError("GGUF export: MLP biases are not part of llama.cpp's Llama graph")
    n_head = cfg.num_attention_heads
    return {
        "n_head": n_head,
        "n_head_kv": _config_value(cfg, "num_key_value_heads", default=n_head),
        "head_dim": _config_value(cfg, "head_dim", default=cfg.hidden_size // n_head),
        "theta": float(theta),
    }


def _float_tensor(t: torch.Tensor, kind: str):
    """``(array, raw_dtype or None, type name)`` for a float tensor stored as ``kind``."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    a = t.detach().to(torch.float32).cpu().numpy()
    if a.ndim == 1 or kind == "f32":
        return a, None, "F32"
    if kind == "f16":
        return a.astype(np.float16), None, "F16"
    if a.shape[-1] % 32:
        return a.astype(np.float16), None, "F16"
    return quants.quantize(a, Q.Q8_0), Q.Q8_0, "Q8_0"


def _quant_tensor(m: QuantLinear, fallback: str):
    """``(array, raw_dtype, type name, exact?, max |Δw| from Q4_1's min rounding, why converted)``."""
    from gguf import GGMLQuantizationType as Q

    s = m.scales
    fp16_scales = torch.equal(s.to(torch.float16).to(s.dtype), s)
    kind = gguf_type_for(m.spec.bits, m.group_cols, m.qzeros is None) if m.spec.fmt.affine else None
    if kind is not None and fp16_scales:
        _, blocks, err = to_gguf_blocks(m.qweight, s, m.qzeros, m.spec.bits, m.in_features, m.group_cols)
        return blocks, getattr(Q, kind), kind, True, err, None
    what = (f"W{m.spec.bits} {m.spec.granularity} {'sym' if m.qzeros is None else 'asym'}" if m.spec.fmt.affine
            else str(m.spec))
    why = what + ("" if kind is None else f" with {m.spec.scale_dtype} scales") + " has no ggml block type"
    a, raw, name = _float_tensor(m.dequantize(torch.float32), fallback)
    return a, raw, name, False, 0.0, why


def _tokenizer_from_template(writer, template: Path) -> None:
    from gguf import GGUFReader

    if not template.is_file():
        raise QBayesError(f"GGUF template {template} does not exist")
    try:
        reader = GGUFReader(str(template))
    except (ValueError, OSError, IndexError) as e:  # gguf raises ValueError on bad magic / version
        raise QBayesError(f"{template} is not a readable GGUF file: {e}") from e
    n = 0
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[1] if len(field.types) > 1 else None
            writer.add_key_value(key, field.contents(), field.types[0], sub)
            n += 1
    if not n:
        raise QBayesError(f"{template} holds no tokenizer metadata")


def _byte_level(part) -> bool:
    """Whether a tokenizer.json pre-tokenizer/decoder entry is (or holds) ByteLevel."""
    if not isinstance(part, dict):
        return False
    if part.get("type") == "ByteLevel":
        return True
    return any(_byte_level(p) for p in part.get("pretokenizers") or part.get("decoders") or [])


def _tokenizer_from_hf(writer, folder: Path, vocab_size: int) -> list[str]:
    """Byte-level BPE vocabulary and merges from ``tokenizer.json``; returns notes for the report."""
    from gguf import TokenType

    path = folder / "tokenizer.json"
    if not path.exists():
        raise QBayesError(f"{folder} has no tokenizer.json: pass a GGUF template to copy the tokenizer from")
    try:
        spec = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QBayesError(f"{path} is not valid JSON: {e}") from e
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise QBayesError(f"GGUF export builds byte-level BPE tokenizers only; {path} is {model.get('type')!r}")
    if not _byte_level(spec.get("pre_tokenizer")) and not _byte_level(spec.get("decoder")):
        raise QBayesError(f"GGUF export builds byte-level BPE tokenizers only; {path} is a BPE without a ByteLevel "
                          "pre-tokenizer or decoder (llama.cpp's gpt2 tokenizer would decode it wrongly): pass "
                          "--template with a GGUF file holding the model's own tokenizer")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [TokenType.UNUSED] * vocab_size
    for tok, i in model["vocab"].items():
        if i < vocab_size:
            tokens[i], types[i] = tok, TokenType.NORMAL
    special = {}
    for a in spec.get("added_tokens", []):
        if a["id"] < vocab_size:
            tokens[a["id"]] = a["content"]
            types[a["id"]] = TokenType.CONTROL if a.get("special") else TokenType.USER_DEFINED
            special[a["content"]] = a["id"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    cfg_path = folder / "tokenizer_config.json"
    tcfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    for key, add in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id),
                     ("unk_token", writer.add_unk_token_id), ("pad_token", writer.add_pad_token_id)):
        v = tcfg.get(key)
        v = v.get("content") if isinstance(v, dict) else v
        if v in special:
            add(special[v])
    if tcfg.get("chat_template"):
        writer.add_chat_template(tcfg["chat_template"])
    return ["tokenizer built from tokenizer.json with llama.cpp's default pre-tokenizer; "
            "pass a GGUF template for the model's own"]


def export_gguf(model: nn.Module, out: str | Path, *, tokenizer_dir: str | Path | None = None,
                template: str | Path | None = None, float_type: str = "f16", fallback: str = "q8_0",
                name: str | None = None) -> dict:
    """Write ``model`` (a qbayes-quantized Llama-family causal LM) as a GGUF file.

    Args:
        out: the ``.gguf`` file to write (written to a temporary name, then renamed).
        tokenizer_dir: folder with the Hugging Face ``tokenizer.json`` (used without ``template``).
        template: a GGUF file to copy the ``tokenizer.*`` metadata from.
        float_type: storage of float matrices (embeddings, untied ``lm_head``): ``f32``, ``f16``, ``q8_0``.
        fallback: storage of packed layers no ggml type holds exactly: ``f32``, ``f16``, ``q8_0``.

    Returns a report: ``{"exact": {gguf name: type}, "converted": {gguf name: (type, why)},
    "q4_1_max_abs_dw": float, "file_type": str, "bytes": int, "notes": [...]}``.
    """
    import gguf

    for what, v in (("float_type", float_type), ("fallback", fallback)):
        if v not in FLOAT_TYPES:
            raise QBayesError(f"unknown {what} {v!r}: choose one of {FLOAT_TYPES}")
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise QBayesError("GGUF export needs a Hugging Face causal LM (the model has no .config)")
    c = _check_config(cfg)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    report: dict = {"exact": {}, "converted": {}, "q4_1_max_abs_dw": 0.0, "notes": []}
    try:
        writer.add_name(name or getattr(cfg, "_name_or_path", "") or "qbayes model")
        writer.add_quantized_by("qbayes")
        writer.add_context_length(int(getattr(cfg, "max_position_embeddings", 2048)))
        writer.add_embedding_length(cfg.hidden_size)
        writer.add_block_count(cfg.num_hidden_layers)
        writer.add_feed_forward_length(cfg.intermediate_size)
        writer.add_head_count(c["n_head"])
        writer.add_head_count_kv(c["n_head_kv"])
        writer.add_rope_dimension_count(c["head_dim"])
        writer.add_rope_freq_base(c["theta"])
        writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
        writer.add_vocab_size(cfg.vocab_size)
        if c["head_dim"] * c["n_head"] != cfg.hidden_size:
            writer.add_key_length(c["head_dim"])
            writer.add_value_length(c["head_dim"])
        if template is not None:
            _tokenizer_from_template(writer, Path(template))
        elif tokenizer_dir is not None:
            report["notes"] += _tokenizer_from_hf(writer, Path(tokenizer_dir), cfg.vocab_size)
        else:
            raise QBayesError("GGUF export needs a tokenizer: give tokenizer_dir (with tokenizer.json) or a GGUF template")

        type_bytes: Counter = Counter()
        quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
        seen: set[int] = set()
        items = [(n + ".weight", m) for n, m in quant.items()] + [(n + ".bias", m.bias) for n, m in quant.items() if m.bias is not None]
        items += [(n, p) for n, p in model.state_dict(keep_vars=True).items() if not n.startswith(tuple(k + "." for k in quant))]
        for hf, obj in items:
            if isinstance(obj, torch.Tensor):
                if obj.data_ptr() in seen:  # tied lm_head: llama.cpp reuses token_embd
                    continue
                seen.add(obj.data_ptr())
            gname = gguf_name(hf)
            if gname is None:
                if "rotary_emb" in hf:
                    continue
                raise QBayesError(f"GGUF export: no llama.cpp tensor for {hf!r}")
            if isinstance(obj, QuantLinear):
                arr, raw, tname, exact, err, why = _quant_tensor(obj, fallback)
                if exact:
                    report["exact"][gname] = tname
                    report["q4_1_max_abs_dw"] = max(report["q4_1_max_abs_dw"], err)
                else:
                    report["converted"][gname] = (tname, why)
            else:
                arr, raw, tname = _float_tensor(obj, float_type)
            if gname.endswith(("attn_q.weight", "attn_q.bias", "attn_k.weight", "attn_k.bias")):
                heads = c["n_head"] if ".attn_q." in gname else c["n_head_kv"]
                arr = arr[rope_row_order(arr.shape[0], heads)]
            arr = np.ascontiguousarray(arr)
            if raw is None:
                writer.add_tensor(gname, arr)
            else:
                writer.add_tensor(gname, arr, raw_shape=arr.shape, raw_dtype=raw)
            if arr.ndim == 2:
                type_bytes[tname] += arr.nbytes
        dominant = max((t for t in type_bytes if t in _FILE_TYPE and t != "F32"), key=type_bytes.get, default="F32")
        report["file_type"] = dominant
        writer.add_file_type(_FILE_TYPE[dominant])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        raise
    finally:
        tmp.unlink(missing_ok=True)
    report["bytes"] = out.stat().st_size
    if report["converted"]:
        log.warning("GGUF export converted %d layers: %s", len(report["converted"]),
                    sorted({why for _, why in report["converted"].values()}))
    return report
