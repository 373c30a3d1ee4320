"""Mixed-precision plan on a tiny Llama: the budget is met and the reported sizes are the checkpoint's bytes."""
import json
import struct

import pytest
import torch

from qbayes import QuantSpec, load_quantized, quantize_, save_quantized
from qbayes.errors import QBayesError
from qbayes.mixed.plan import layer_bytes, mixed_specs, size_summary
from qbayes.mixed.sensitivity import sensitivity

from .conftest import VOCAB, tiny_llama

SPEC = QuantSpec(bits=4, group_size=16)


@pytest.fixture(scope="module")
def table():
    torch.set_num_threads(1)
    model = tiny_llama(seed=4)
    batches = list(torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(2)).split(2))
    return sensitivity(model, batches, criteria=("output", "fisher"), bits=(2, 3, 4, 8), spec=SPEC, progress=False)


@pytest.mark.parametrize("avg", [2.0, 3.0, 3.5, 4.0, 6.0])
def test_budget_respected(table, avg):
    specs, alloc = mixed_specs(table, "output", avg)
    n = sum(table.sizes.values())
    code_bits = sum(table.sizes[k] * s.bits for k, s in specs.items())
    assert code_bits <= avg * n
    assert alloc.avg_bits == pytest.approx(code_bits / n)
    # every layer shares a group size whose chunks fill: packed bits are the nominal bits
    assert size_summary(specs, table.shapes)["code_bits_per_weight"] == pytest.approx(code_bits / n)


def test_reported_sizes_add_up_to_the_checkpoint(table, tmp_path, calib_ids):
    specs, _ = mixed_specs(table, "fisher", 3.5)
    assert len({s.bits for s in specs.values()}) > 1  # really mixed
    model = tiny_llama(seed=4)
    quantize_(model, specs, method="gptq", calib=calib_ids, progress=False)
    out = save_quantized(model, tmp_path / "q")
    summary = size_summary(specs, table.shapes)
    weights = out / "model.safetensors"
    raw = weights.read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + header_len])
    quant_keys = {f"{n}.{b}" for n in specs for b in ("qweight", "scales", "qzeros")}
    float_bytes = sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()
                      if k != "__metadata__" and k not in quant_keys)
    meta_bytes = (out / "qbayes.json").stat().st_size
    assert 8 + header_len + summary["code_bytes"] + summary["overhead_bytes"] + float_bytes + meta_bytes \
        == weights.stat().st_size + meta_bytes
    # and per layer, against the tensors actually stored
    for n, s in specs.items():
        lb = layer_bytes(s, *table.shapes[n])
        size = lambda k: header[k]["data_offsets"][1] - header[k]["data_offsets"][0]  # noqa: E731
        assert size(f"{n}.qweight") == lb["code"]
        assert size(f"{n}.scales") + size(f"{n}.qzeros") == lb["overhead"]
    again, _ = load_quantized(out)
    assert {k: v["bits"] for k, v in again.qbayes_config["layers"].items()} == {k: s.bits for k, s in specs.items()}


def test_plan_errors(table):
    with pytest.raises(QBayesError, match="no scores at"):
        mixed_specs(table, "output", 3.0, bits=(3, 5))
    with pytest.raises(QBayesError):
        mixed_specs(table, "output", 1.0)
    with pytest.raises(QBayesError, match="not computed"):
        mixed_specs(table, "hawq", 3.0)
