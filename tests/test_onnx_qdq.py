"""QDQ ONNX export of activation-quantized models: ONNX Runtime's QuantizeLinear is qbayes's rounding
rule bit for bit (division, not a reciprocal; ties to even), a network whose float arithmetic is exact
(power-of-two scales, no bias) runs bit-identically in ONNX Runtime, the weight initializers are the
packed codes, and conv nets with batch norm, a tiny ViT, dynamic and log quantizers match qbayes."""
import pytest
import torch
from torch import nn

from qbayes import ActSpec, QuantSpec, quantize_, quantize_activations_
from qbayes.errors import QBayesError
from qbayes.formats import unpack
from qbayes.nn import QuantConv2d, QuantLinear

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

from qbayes.export.onnx_qdq import _scope, check_qdq, compare_codes, export_qdq, ort_session  # noqa: E402
from qbayes.kernels.int8 import cpu_has_vnni  # noqa: E402

INT8, INT4 = onnx.TensorProto.INT8, onnx.TensorProto.INT4


def _quantize(model, calib, aspec, wspec, convs=True, **act):
    quantize_activations_(model, aspec, calib, progress=False, **act)
    quantize_(model, wspec, "rtn", convs=convs, float_dtype="float32", progress=False)
    return model


def _pow2(t: torch.Tensor) -> torch.Tensor:
    return torch.exp2(torch.round(torch.log2(t)))


def _dyadic_net(bits: int) -> nn.Module:
    """Conv + pool + linears without bias, every scale a power of two: each product and partial sum
    of the integer codes is exact in float32, so qbayes and ONNX Runtime compute the same numbers."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 8, 3, groups=2, bias=False), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 2 * 2, 64, bias=False), nn.ReLU(), nn.Linear(64, 10, bias=False)).eval()
    calib = torch.randn(32, 3, 8, 8)
    _quantize(model, calib, ActSpec(8), QuantSpec(bits, -1, symmetric=True, scale_dtype="float32"))
    for m in model.modules():
        if hasattr(m, "input_quant"):
            m.input_quant.scale = _pow2(m.input_quant.scale)
        if isinstance(m, QuantLinear):
            m.scales.copy_(_pow2(m.scales))
    return model, calib


@pytest.fixture(scope="module", params=[8, 4])
def dyadic(request, tmp_path_factory):
    model, calib = _dyadic_net(request.param)
    path = tmp_path_factory.mktemp("qdq") / "dyadic.onnx"
    report = export_qdq(model, calib[:2], path)
    return request.param, model, calib, path, report


def test_quantize_linear_divides_and_rounds_half_to_even_like_qbayes(tmp_path):
    model = _quantize(nn.Sequential(nn.Linear(16, 4)).eval(), torch.randn(8, 16) * 2, ActSpec(8),
                      QuantSpec(8, -1, symmetric=True, scale_dtype="float32"))
    q = model[0].input_quant
    path = tmp_path / "one.onnx"
    for scale in (0.0123, 0.25):  # 0.0123: x * (1/s) rounds 61 of 200k values differently; 0.25: exact ties
        q.scale, q.zero = torch.tensor(scale), torch.tensor(128.0)
        export_qdq(model, torch.zeros(2, 16), path)
        g = torch.Generator().manual_seed(1)
        x = torch.cat([torch.randn(4096, 16, generator=g) * 60 * scale,
                       ((torch.arange(-64, 64) + 0.5) * scale).repeat(2).view(16, 16)])
        codes = compare_codes(path, model, x)["0.input_quant"]
        assert codes["rule_mismatches"] == 0 and codes["flipped"] == 0
        if scale == 0.25:  # ties: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -0.5 -> 0, -1.5 -> -2 in both
            xt = torch.tensor([0.125, 0.375, 0.625, -0.125, -0.375]).repeat(16, 1).T.contiguous()
            assert compare_codes(path, model, xt)["0.input_quant"]["rule_mismatches"] == 0
            assert torch.equal(torch.round(xt[:, 0] / 0.25), torch.tensor([0.0, 2.0, 2.0, -0.0, -2.0]))
        else:
            recip = torch.round(x * (1 / torch.tensor(scale))) != torch.round(x / scale)
            assert recip.any()  # the test would see a reciprocal


# without VNNI, ONNX Runtime's fused int8 operators (the optimized modes) saturate u8*s8 products in int16
FUSED_OK = pytest.mark.skipif(not cpu_has_vnni(), reason="no VNNI here: ONNX Runtime's fused int8 kernels "
                              "saturate u8*s8 pairs; only the unoptimized graph is exact on this CPU")


@pytest.mark.parametrize("mode", ["none", pytest.param("faithful", marks=FUSED_OK), pytest.param("default", marks=FUSED_OK)])
def test_exact_arithmetic_network_is_bit_identical_in_onnx_runtime(dyadic, mode):
    bits, model, calib, path, _ = dyadic
    got = ort_session(path, mode).run(None, {"input": calib.numpy()})[0]
    with torch.no_grad():
        assert torch.equal(torch.from_numpy(got), model(calib))
    assert check_qdq(path, model, calib, mode=mode) == 0.0


def test_graph_is_qdq_around_matmul_and_conv_with_the_packed_codes(dyadic):
    bits, model, _, path, report = dyadic
    graph = onnx.load(str(path)).graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantConv2d)) and "packed" not in n}
    assert sorted(report["weights"]["int4" if bits == 4 else "int8"]) == sorted(layers)
    assert len(report["activations"]["qdq"]) == 4 and not report["activations"]["float"]
    seen = set()
    for node in graph.node:
        if node.op_type not in ("MatMul", "Conv"):
            continue
        act, wdq = (producer[i] for i in node.input[:2])
        assert act.op_type == wdq.op_type == "DequantizeLinear"
        assert producer[act.input[0]].op_type == "QuantizeLinear"
        codes, scale = inits[wdq.input[0]], onnx.numpy_helper.to_array(inits[wdq.input[1]])
        assert codes.data_type == (INT4 if bits == 4 else INT8)
        name = _scope(wdq)
        seen.add(name)
        lin = layers[name].packed if isinstance(layers[name], QuantConv2d) else layers[name]
        expect = unpack(lin.qweight, bits, lin.in_features).to(torch.int16) - (1 << (bits - 1))  # signed codes
        got = torch.from_numpy(onnx.numpy_helper.to_array(codes).astype("int16"))
        if node.op_type == "MatMul":
            got = got.T
        assert torch.equal(got.reshape(expect.shape), expect)
        assert torch.equal(torch.from_numpy(scale.copy()), lin.scales[:, 0].float())
        axis = next(a.i for a in wdq.attribute if a.name == "axis")
        assert axis == (1 if node.op_type == "MatMul" else 0)  # per output channel
    assert seen == set(layers)


def test_model_is_unchanged_after_export(dyadic):
    _, model, calib, _, _ = dyadic
    assert not any(k in m.__dict__ for m in model.modules() for k in ("forward", "forward_override"))
    before = model(calib)
    export_qdq(model, calib[:2], dyadic[3].with_name("again.onnx"))
    assert torch.equal(model(calib), before)


@pytest.mark.parametrize("fold", [False, True])
def test_conv_net_with_batch_norm_matches(fold, tmp_path):
    from qbayes.transforms import TRANSFORMS

    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3),
                          nn.ReLU(), nn.BatchNorm2d(16), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    for bn in (model[1], model[5]):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    model.eval()
    if fold:
        TRANSFORMS["bnfold"](model)
    calib = torch.randn(32, 3, 8, 8)
    _quantize(model, calib, ActSpec(8), QuantSpec(8, -1, symmetric=True, scale_dtype="float32"))
    report = export_qdq(model, calib[:2], tmp_path / "cnn.onnx")
    # folding takes the norm after the first conv; the one after a ReLU stays
    assert report["ops"]["QuantizeLinear"] == 3 and report["ops"]["BatchNormalization"] == (1 if fold else 2)
    x = torch.randn(16, 3, 8, 8)
    codes = compare_codes(tmp_path / "cnn.onnx", model, x)
    assert all(c["rule_mismatches"] == 0 for c in codes.values())
    # a value within float rounding of a tie may round the other way (then later codes follow it)
    flipped = sum(c["flipped"] for c in codes.values())
    assert check_qdq(tmp_path / "cnn.onnx", model, x) <= (1e-3 if flipped == 0 else 1e-2)
    assert flipped <= 1e-3 * sum(c["codes"] for c in codes.values())


def test_tiny_vit_with_attention_matmuls_matches(tmp_path):
    from qbayes.models.vision import ViT

    torch.manual_seed(3)
    model = ViT(image=8, patch=4, dim=32, depth=2, heads=2, mlp=64).eval()
    calib = torch.randn(32, 1, 8, 8)
    _quantize(model, calib, ActSpec(8), QuantSpec(8, -1, symmetric=True, scale_dtype="float32"),
              matmuls=ActSpec(8), softmax=ActSpec(4, format="logsqrt2"))
    report = export_qdq(model, calib[:2], tmp_path / "vit.onnx")
    assert len(report["activations"]["qdq"]) == 2 * (4 + 3) + 1  # qkv/proj/mlp inputs, q/k/v points, head
    assert set(report["activations"]["float"]) == {"blocks.0.attn.probs_point", "blocks.1.attn.probs_point"}
    assert report["float_layers"] == ["patch_embed"]
    x = torch.randn(7, 1, 8, 8)  # another batch size: the batch dimension stayed dynamic
    codes = compare_codes(tmp_path / "vit.onnx", model, x)
    assert all(c["rule_mismatches"] == 0 for c in codes.values())
    flipped = sum(c["flipped"] for c in codes.values())
    mode = "faithful" if cpu_has_vnni() else "none"  # see FUSED_OK
    assert check_qdq(tmp_path / "vit.onnx", model, x, mode=mode) <= (1e-3 if flipped == 0 else 1e-2)


def test_dynamic_per_token_quantizers_are_float_ops_with_the_same_function(tmp_path):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 8)).eval()
    calib = torch.randn(16, 5, 32)
    _quantize(model, calib, ActSpec(8, "per-token", dynamic=True), QuantSpec(8, -1), convs=False)
    report = export_qdq(model, calib[:2], tmp_path / "dyn.onnx", dynamic_axes={"input": {0: "batch", 1: "tokens"}})
    assert set(report["activations"]["float"]) == {"0.input_quant", "2.input_quant"}
    assert "QuantizeLinear" not in report["ops"] and report["ops"]["DequantizeLinear"] == 2
    x = torch.randn(3, 9, 32) * 2
    # (mode "default" would let ONNX Runtime's MatMulNBits fusion quantize the float input once more)
    assert check_qdq(tmp_path / "dyn.onnx", model, x) <= 1e-5
    assert check_qdq(tmp_path / "dyn.onnx", model, x, mode="none") <= 1e-5
    dims = onnx.load(str(tmp_path / "dyn.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", "tokens", 32]


def test_errors_leave_no_file_and_the_model_untouched(tmp_path):
    from qbayes.bayes.bbb import MeanFieldLinear
    from qbayes.nn.act_quant import quantize_inputs

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    with pytest.raises(QBayesError, match="no activation quantizers or packed layers"):
        export_qdq(model, torch.zeros(2, 8), tmp_path / "a.onnx")
    quantize_inputs(model, ["0"], ActSpec(8))  # attached, never calibrated
    with pytest.raises(QBayesError, match="not calibrated"):
        export_qdq(model, torch.zeros(2, 8), tmp_path / "a.onnx")
    model[0].input_quant(torch.randn(4, 8))
    model[0].input_quant.freeze()
    model[2] = MeanFieldLinear(nn.Linear(8, 2))
    with pytest.raises(QBayesError, match="MeanFieldLinear .* has no QDQ ONNX export"):
        export_qdq(model, torch.zeros(2, 8), tmp_path / "a.onnx")
    assert "forward" not in model[0].input_quant.__dict__  # the quantizer's override was undone
    with pytest.raises(QBayesError, match="not inputs"):
        export_qdq(nn.Sequential(model[0]), torch.zeros(2, 8), tmp_path / "a.onnx", dynamic_axes={"x": {0: "b"}})
    assert not list(tmp_path.iterdir())
