"""Fuzz the loader (issue 13): a seeded loop of a few hundred damaged copies of a tiny checkpoint —
truncations, byte flips, JSON edits of every kind (values, types, missing and extra keys, deep
nesting, huge numbers) and non-regular files in place of its files. Each case must either load
with logits and tokenization identical to the original or raise a QBayesError; none may hang
(each load is time-limited), raise anything else, or load with different logits."""
import json
import os
import random
import shutil
import signal

import pytest
import torch

import qbayes.io as qio
from qbayes import QBayesError, QuantSpec, load_quantized, quantize_, save_quantized

from .conftest import tiny_llama

CASES = 300
IDS = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))
TEXT = "the market closed higher on tuesday"
FILES = [qio.WEIGHTS, qio.META, "tokenizer.json", "tokenizer_config.json"]


class Hang(Exception):
    pass


def _alarm(*_):
    raise Hang()


@pytest.fixture(scope="module")
def base(tmp_path_factory, model_dir):
    from transformers import AutoTokenizer
    m = tiny_llama()
    quantize_(m, QuantSpec(3, 32), "rtn", progress=False)
    d = tmp_path_factory.mktemp("fuzz") / "base"
    tok = AutoTokenizer.from_pretrained(model_dir)
    save_quantized(m, d, tokenizer=tok)
    with torch.no_grad():
        ref = m(input_ids=IDS, use_cache=False).logits
    return d, ref, tok(TEXT).input_ids


def _random_value(rng: random.Random):
    return rng.choice([
        None, True, False, 0, -1, 1, 3, 2**31, 10**30, -(10**12), int("9" * 300), 0.5, -1e-9, 1e308,
        float("nan"), float("inf"), float("-inf"), "", "x", "float16", "gptq", "LlamaForCausalLM", "../../etc/passwd",
        [], [1, 2], {}, {"bits": 4}, [[[]]], {"a": {"b": {"c": None}}},
    ])


def _paths(node, prefix=()):
    """Every (container path) in a JSON tree."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node[:4]):
            yield from _paths(v, prefix + (i,))


def _json_edit(text: str, rng: random.Random) -> str:
    doc = json.loads(text)
    op = rng.choice(["set", "set", "delete", "add", "deep", "huge", "retype", "whole"])
    if op == "deep":
        n = rng.choice([100, 5000, 200000])
        return text[:-1].rstrip() + f', "deep": {"[" * n}{"]" * n}}}'
    if op == "huge":
        return text[:-1].rstrip() + f', "n": {"9" * rng.choice([20, 400, 5000])}, "f": 1e999}}'
    if op == "whole":
        return rng.choice(["[]", "null", "1", '"qbayes"', "{}", "{" * 50])
    paths = list(_paths(doc))
    path = rng.choice(paths)
    parent, key = doc, None
    for k in path[:-1]:
        parent = parent[k]
    if path:
        key = path[-1]
    target = parent[key] if path else doc
    if op == "add" and isinstance(target, dict):
        target[rng.choice(["extra", "bits", "layers", "sha256", "model_class"])] = _random_value(rng)
    elif op == "delete" and path and isinstance(parent, dict):
        del parent[key]
    elif op == "retype" and path:
        parent[key] = [target] if not isinstance(target, list) else {"v": target}
    elif path:
        parent[key] = _random_value(rng)
    return json.dumps(doc, allow_nan=True)


def _damage(d, rng: random.Random) -> str:
    name = rng.choice(FILES)
    f = d / name
    kind = rng.choice(["truncate", "flip", "flip", "json", "json", "json", "special"])
    if kind == "json" and name.endswith(".json"):
        f.write_text(_json_edit(f.read_text(), rng))
        return f"json edit of {name}"
    if kind == "special":
        f.unlink()
        what = rng.choice(["fifo", "dir", "devzero", "dangling", "empty", "missing"])
        if what == "fifo":
            os.mkfifo(f)
        elif what == "dir":
            f.mkdir()
        elif what == "devzero":
            f.symlink_to("/dev/zero")
        elif what == "dangling":
            f.symlink_to(d / "nothing-here")
        elif what == "empty":
            f.write_bytes(b"")
        return f"{name} replaced by {what}"
    data = bytearray(f.read_bytes())
    if kind == "truncate" or not data:
        cut = rng.randrange(0, max(len(data), 1))
        f.write_bytes(bytes(data[:cut]))
        return f"{name} truncated to {cut} of {len(data)} bytes"
    for _ in range(rng.choice([1, 1, 2, 8])):
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
    f.write_bytes(bytes(data))
    return f"bit flips in {name}"


def test_damaged_checkpoints_load_identically_or_raise_a_qbayes_error(base, tmp_path):
    src, ref, ref_ids = base
    rng = random.Random(20261207)
    old = signal.signal(signal.SIGALRM, _alarm)
    outcomes = {"refused": 0, "identical": 0}
    try:
        for case in range(CASES):
            d = tmp_path / f"c{case}"
            shutil.copytree(src, d, symlinks=True)
            what = _damage(d, rng)
            signal.alarm(10)
            try:
                model, tok = load_quantized(d)
                with torch.no_grad():
                    got = model(input_ids=IDS, use_cache=False).logits
                assert torch.equal(got, ref), f"case {case} ({what}) loaded with different logits"
                assert tok is not None and tok(TEXT).input_ids == ref_ids, f"case {case} ({what}): tokenizer differs"
                outcomes["identical"] += 1
            except QBayesError:
                outcomes["refused"] += 1
            except Hang:
                pytest.fail(f"case {case} ({what}) hung")
            except Exception as e:  # noqa: BLE001 - the point of the test
                pytest.fail(f"case {case} ({what}) raised {type(e).__name__}: {e}")
            finally:
                signal.alarm(0)
            shutil.rmtree(d, ignore_errors=True)
    finally:
        signal.signal(signal.SIGALRM, old)
    assert outcomes["refused"] > CASES // 2, outcomes  # the damage is real, not mostly no-ops


def test_forged_metadata_never_gives_a_raw_exception_or_a_hang(base, tmp_path):
    """The structural checks behind the hash: JSON edits of qbayes.json whose metadata hash is
    rewritten to match (a forger, or a hand edit re-hashed). Some such edits are valid checkpoints
    (a different rope_theta loads, with other logits); every other one must be a QBayesError."""
    src, _, _ = base
    rng = random.Random(7)
    old = signal.signal(signal.SIGALRM, _alarm)
    refused = 0
    try:
        for case in range(200):
            d = tmp_path / f"f{case}"
            shutil.copytree(src, d, symlinks=True)
            text = _json_edit((d / qio.META).read_text(), rng)
            try:
                meta = json.loads(text)
            except (ValueError, RecursionError):
                meta = None
            if isinstance(meta, dict):
                try:
                    meta["meta_sha256"] = qio.meta_digest(meta)
                    text = json.dumps(meta, allow_nan=True)
                except (ValueError, RecursionError):  # nesting too deep to re-serialise: keep the edit
                    pass
            (d / qio.META).write_text(text)
            signal.alarm(10)
            try:
                load_quantized(d)
            except QBayesError:
                refused += 1
            except Hang:
                pytest.fail(f"forged case {case} hung")
            except Exception as e:  # noqa: BLE001
                pytest.fail(f"forged case {case} raised {type(e).__name__}: {e}\n{text[:300]}")
            finally:
                signal.alarm(0)
            shutil.rmtree(d, ignore_errors=True)
    finally:
        signal.signal(signal.SIGALRM, old)
    assert refused > 50
