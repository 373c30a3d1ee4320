"""ONNX export: ONNX Runtime's logits equal qbayes's, with the packed weights kept packed."""
import pytest
import torch

from qbayes import QuantSpec, load_quantized, quantize_, save_quantized
from qbayes.errors import QBayesError

from .conftest import VOCAB, tiny_llama

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

from qbayes.export import export_onnx  # noqa: E402


@pytest.mark.parametrize("spec,kind", [
    (QuantSpec(bits=4, group_size=32), "MatMulNBits"),
    (QuantSpec(bits=2, group_size=16, symmetric=True), "MatMulNBits"),
    (QuantSpec(bits=8, group_size=32), "DequantizeLinear"),
    (QuantSpec(bits=3, group_size=32), "float"),
    (QuantSpec(bits=4, group_size=32, format="nf4"), "float"),  # no ONNX Runtime op decodes NF4: listed, converted
])
def test_onnx_logits_match(spec, kind, tmp_path, calib_ids):
    torch.set_num_threads(1)
    model = tiny_llama()
    quantize_(model, spec, method="gptq", calib=calib_ids, progress=False)
    save_quantized(model, tmp_path / "q")
    model, _ = load_quantized(tmp_path / "q")  # export what was saved
    report = export_onnx(model, tmp_path / "m.onnx")
    n_layers = 14
    assert (len(report[kind]) if kind == "float" else report[kind]) == n_layers
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    ops = [n.op_type for n in graph.node]
    if kind != "float":
        assert ops.count(kind) == n_layers
        # packed codes travel as uint8 initializers, not as float weights
        u8 = [i for i in graph.initializer if i.data_type == onnx.TensorProto.UINT8]
        assert len(u8) >= n_layers
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for shape in [(1, 5), (3, 17)]:
        ids = torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(shape[1]))
        got = torch.from_numpy(sess.run(None, {"input_ids": ids.numpy()})[0])
        with torch.no_grad():
            ref = model(input_ids=ids, use_cache=False).logits
        assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_export_of_a_float_model_is_refused(tmp_path):
    with pytest.raises(QBayesError, match="no QuantLinear"):
        export_onnx(tiny_llama(), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("spec", [QuantSpec(bits=4, group_size=32), QuantSpec(bits=8, group_size=32)])
def test_decode_step_graph_with_kv_cache(spec, tmp_path, calib_ids):
    """Prefill and single-token steps through the exported cache equal the model's full forward."""
    from qbayes.export.onnx_decode import check_decoder, export_onnx_decoder, ort_generate
    from qbayes.generate import generate

    torch.set_num_threads(1)
    model = tiny_llama(seed=2)
    quantize_(model, spec, method="gptq", calib=calib_ids, progress=False)
    path = tmp_path / "step.onnx"
    report = export_onnx_decoder(model, path, max_positions=64)
    assert report["MatMulNBits" if spec.bits == 4 else "DequantizeLinear"] == 14
    names = [i.name for i in ort.InferenceSession(str(path)).get_inputs()]
    assert names == ["input_ids", "past_keys", "past_values"]
    assert check_decoder(path, model, prompt_len=5, steps=4) <= 1e-4
    # greedy generation in ONNX Runtime gives qbayes's tokens
    prompt = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(3))

    class Tok:
        eos_token_id = None

        def decode(self, ids, skip_special_tokens=True):
            return ",".join(map(str, ids))

    ours = generate(model, Tok(), prompt, 10)
    theirs = ort_generate(path, prompt, 10)
    assert ",".join(map(str, theirs["tokens"])) == ours.text and theirs["tokens_per_s"] > 0


def test_decode_step_export_refuses_other_architectures(tmp_path, calib_ids):
    from qbayes.export.onnx_decode import export_onnx_decoder

    from .conftest import tiny_opt
    model = tiny_opt()
    quantize_(model, QuantSpec(bits=4, group_size=32), method="rtn", progress=False)
    with pytest.raises(QBayesError, match="Llama-architecture models only: model type 'opt'"):
        export_onnx_decoder(model, tmp_path / "s.onnx")
    assert not (tmp_path / "s.onnx").exists()
