"""qbayes layers as ggml blocks, decoded by the gguf package's own reference dequantizer."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from qbayes import QuantSpec
from qbayes.algorithms.rtn import rtn
from qbayes.errors import QBayesError
from qbayes.export.gguf_blocks import gguf_type_for, to_gguf_blocks
from qbayes.nn import QuantLinear

gguf = pytest.importorskip("gguf")


def _layer(bits, sym, rows, blocks, seed, group=32):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, blocks * 32, generator=g) * torch.rand(rows, 1, generator=g)
    spec = QuantSpec(bits=bits, group_size=group, symmetric=sym)
    return QuantLinear.from_quantized(rtn(W, None, spec), spec)


@settings(max_examples=30, deadline=None)
@given(case=st.sampled_from([(4, True), (4, False), (8, True)]), rows=st.integers(1, 12), blocks=st.integers(1, 4),
       seed=st.integers(0, 1000))
def test_blocks_decode_to_the_qbayes_weights(case, rows, blocks, seed):
    bits, sym = case
    ql = _layer(bits, sym, rows, blocks, seed)
    kind, data, err = to_gguf_blocks(ql.qweight, ql.scales, ql.qzeros, bits, ql.in_features, ql.group_cols)
    assert kind == gguf_type_for(bits, 32, sym)
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    assert data.shape == (rows, blocks * type_size)
    decoded = torch.from_numpy(gguf.quants.dequantize(data, qtype).astype(np.float32)).reshape(rows, -1)
    ref = ql.dequantize()
    if kind in ("Q4_0", "Q8_0"):
        assert torch.equal(decoded, ref)  # bit-exact
    else:  # Q4_1: only the float16 rounding of the block minimum -s*z
        assert (decoded - ref).abs().max() <= err + 1e-6 * ref.abs().max()
        assert err <= 2 ** -11 * float(ql.scales.float().abs().max()) * 15


def test_layouts_without_a_block_type_are_refused():
    ql = _layer(4, True, 2, 2, 0, group=64)
    with pytest.raises(QBayesError, match="no GGUF block type"):
        to_gguf_blocks(ql.qweight, ql.scales, ql.qzeros, 4, ql.in_features, ql.group_cols)
    assert gguf_type_for(8, 32, False) is None and gguf_type_for(3, 32, True) is None
