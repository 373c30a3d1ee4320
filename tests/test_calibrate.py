"""The interleaved (coroutine) driver against a naive true-sequential reference."""
import copy

import torch

from qbayes import QuantSpec, quantize_
from qbayes.algorithms import gptq
from qbayes.calibrate import discover_stages
from qbayes.curvature import InputSecondMoment
from qbayes.models import adapter_for
from qbayes.nn import QuantLinear, find_linears

from .conftest import tiny_llama, tiny_opt


def naive_sequential(model, ids, spec, batch):
    """Quantize stage by stage, re-running every block from its (already quantized) inputs for
    each stage: the definition of true-sequential GPTQ, at several times the cost."""
    adapter = adapter_for(model)
    codes = {}
    with torch.no_grad():
        for bname, block in adapter.blocks():
            linears = find_linears(block)
            # inputs of block i: run the model and hook block i instead
            inputs = []
            h = block.register_forward_pre_hook(lambda m, a, k: inputs.append((a, dict(k))), with_kwargs=True)
            for ids_b in ids.split(batch):
                model(input_ids=ids_b, use_cache=False)
            h.remove()
            stages, _ = discover_stages(block, linears, *inputs[0])
            for stage in stages:
                stat = InputSecondMoment(linears[stage[0]].in_features)
                hk = linears[stage[0]].register_forward_pre_hook(lambda m, a: stat.update(a[0]))
                for a, k in inputs:
                    block(*a, **k)
                hk.remove()
                W = torch.cat([linears[n].weight for n in stage])
                qw = gptq(W, stat.H, spec)
                parts = qw.split_rows([linears[n].out_features for n in stage])
                for n, p in zip(stage, parts):
                    linears[n].weight.data = p.dequantize()
                    codes[f"{bname}.{n}"] = p.codes
    return codes


def test_interleaved_driver_matches_naive_true_sequential(calib_ids):
    for make in (tiny_llama, tiny_opt):
        m = make()
        ref_model = copy.deepcopy(m)
        spec = QuantSpec(4, 16, clip="minmax")
        quantize_(m, spec, "gptq", calib_ids, batch_size=2, float_dtype="float32", progress=False)
        ref = naive_sequential(ref_model, calib_ids, spec, batch=2)
        got = {n: mod for n, mod in m.named_modules() if isinstance(mod, QuantLinear)}
        assert set(got) == set(ref)
        for n, mod in got.items():
            from qbayes.formats import unpack
            assert torch.equal(unpack(mod.qweight, 4, mod.in_features), ref[n]), n


def test_stages_group_linears_by_shared_input(calib_ids):
    m = tiny_llama()
    block = m.model.layers[0]
    inputs = []
    h = block.register_forward_pre_hook(lambda mod, a, k: inputs.append((a, dict(k))), with_kwargs=True)
    m(input_ids=calib_ids[:1])
    h.remove()
    stages, never = discover_stages(block, find_linears(block), *inputs[0])
    assert [sorted(s) for s in stages] == [["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"],
                                          ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    assert never == []
