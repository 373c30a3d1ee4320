"""NF4 (QLoRA's 4-bit NormalFloat) as a second format through the registry: the levels against
the published table, nearest-level encoding, and RTN/GPTQ -> QuantLinear -> save -> reload."""
import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from qbayes import QuantSpec, load_quantized, quantize_, save_quantized
from qbayes.algorithms import gptq, layer_objective, rtn
from qbayes.errors import QBayesError
from qbayes.formats import FORMATS, get_format, group_view
from qbayes.formats.nf4 import levels
from qbayes.io import checkpoint_bytes
from qbayes.mixed.plan import layer_bytes
from qbayes.nn import QuantLinear

from .conftest import VOCAB, tiny_llama

# Appendix E of Dettmers et al. 2023 (QLoRA), four decimals
PUBLISHED = [-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
             0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0]


def test_levels_match_the_published_table():
    lv = levels(torch.float64)
    assert lv.shape == (16,) and torch.all(lv[1:] > lv[:-1])
    assert torch.allclose(lv, torch.tensor(PUBLISHED, dtype=torch.float64), atol=6e-5)
    assert lv[7] == 0 and lv[0] == -1 and lv[15] == 1


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([1e-3, 1.0, 30.0]))
def test_encode_is_nearest_level(seed, amp):
    fmt = get_format("nf4")
    w = torch.randn(6, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * amp
    s, z = fmt.params_from_range(w.amin(-1, keepdim=True), w.amax(-1, keepdim=True), 4, True, torch.float16)
    assert torch.all(s >= w.abs().amax(-1, keepdim=True))  # rounded up: every |w/s| <= 1
    c = fmt.encode(w, s, z, 4)
    lv = levels(torch.float64)
    dist = ((w / s).unsqueeze(-1) - lv).abs()
    assert torch.all(dist.gather(-1, c.long().unsqueeze(-1)).squeeze(-1) <= dist.min(-1).values + 1e-12)
    assert torch.equal(fmt.decode(c, s, z), lv[c.long()] * s)


def test_spec_validation_and_symmetry():
    assert QuantSpec(format="nf4").symmetric  # no zero-point to fit
    with pytest.raises(QBayesError, match="4-bit codes"):
        QuantSpec(bits=3, format="nf4")
    with pytest.raises(QBayesError, match="unknown number format"):
        QuantSpec(format="fp5")
    assert set(FORMATS) >= {"int", "nf4"}
    assert str(QuantSpec(4, 64, format="nf4")) == "NF4 group-64 (mse)"


def test_storage_is_4_bits_plus_one_scale_per_block():
    b = layer_bytes(QuantSpec(4, 64, format="nf4"), 128, 256)
    assert b == {"code": 128 * 256 // 2, "overhead": 128 * 4 * 2}  # no zero-points


@pytest.mark.parametrize("clip", ["minmax", "mse"])
def test_rtn_packed_layer_equals_unpacked(clip):
    W = torch.randn(48, 128, generator=torch.Generator().manual_seed(0))
    spec = QuantSpec(4, 64, clip=clip, format="nf4")
    qw = rtn(W, None, spec)
    assert qw.format == "nf4"
    m = QuantLinear.from_quantized(qw, spec)
    assert m.qzeros is None and m.qweight.dtype == torch.uint8 and m.qweight.shape == (48, 64)
    assert torch.equal(m.dequantize(), qw.dequantize())
    x = torch.randn(3, 128)
    assert torch.allclose(m(x), x @ qw.dequantize().T, atol=1e-5)
    err = group_view((qw.dequantize() - W).abs(), 64)
    if clip == "minmax":  # every weight within half the widest level gap of its scale
        gap = float((levels()[1:] - levels()[:-1]).max())
        assert torch.all(err <= gap / 2 * qw.scale.unsqueeze(-1) + 1e-6)
    else:  # the range search never does worse than the full absmax range, group by group
        ref = group_view((rtn(W, None, QuantSpec(4, 64, clip="minmax", format="nf4")).dequantize() - W).abs(), 64)
        assert torch.all(err.pow(2.4).sum(-1) <= ref.pow(2.4).sum(-1) * (1 + 1e-5))


def test_gptq_nf4_beats_rtn_nf4_on_the_layer_objective():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(32, 64, generator=g, dtype=torch.float64)
    X = torch.randn(500, 64, generator=g, dtype=torch.float64) @ torch.randn(64, 64, generator=g, dtype=torch.float64)
    H = 2 * X.T @ X / 500
    spec = QuantSpec(4, 32, format="nf4")
    e_g = layer_objective(W, gptq(W, H, spec).dequantize(torch.float64), H)
    e_r = layer_objective(W, rtn(W, None, spec).dequantize(torch.float64), H)
    assert e_g < 0.8 * e_r


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_nf4_model_saves_and_reloads_with_identical_logits(tmp_path, method):
    model = tiny_llama()
    calib = torch.randint(0, VOCAB, (4, 24), generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(2))
    quantize_(model, QuantSpec(4, 32, format="nf4"), method, calib, progress=False)
    with torch.no_grad():
        q = model(input_ids=ids).logits
    save_quantized(model, tmp_path / "c")
    loaded, _ = load_quantized(tmp_path / "c")
    assert all(m.spec.format == "nf4" for m in loaded.modules() if isinstance(m, QuantLinear))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, q)
    assert checkpoint_bytes(tmp_path / "c") > 0
