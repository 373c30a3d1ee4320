"""Float-target (GPTAQ-style) calibration: the closed form against least squares in float64, and
the two-stream driver against a naive reference that re-runs a float and a quantized model."""
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qbayes import QuantSpec, quantize_
from qbayes.algorithms import float_target_weight, gptq
from qbayes.curvature import InputCrossMoment, InputSecondMoment
from qbayes.errors import QBayesError
from qbayes.formats import unpack
from qbayes.models import adapter_for
from qbayes.nn import QuantLinear, find_linears

from .conftest import tiny_llama


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), out=st.integers(1, 6), dim=st.integers(1, 8),
       n=st.integers(1, 40), damp=st.floats(1e-3, 1.0))
def test_float_target_is_the_ridge_least_squares_solution(seed, out, dim, n, damp):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, dim, generator=g, dtype=torch.float64)
    Xf = torch.randn(n, dim, generator=g, dtype=torch.float64)
    Xq = Xf + 0.3 * torch.randn(n, dim, generator=g, dtype=torch.float64)
    H = 2 / n * Xq.T @ Xq
    C = 2 / n * Xf.T @ Xq
    lam = damp * float(torch.diag(H).mean())
    got = float_target_weight(W, H, C, damp)
    # min ||Xf Wᵀ - Xq Vᵀ||² + (λ n / 2) ||V - W||²  as one stacked least-squares problem
    r = (lam * n / 2) ** 0.5
    A = torch.cat([Xq, r * torch.eye(dim, dtype=torch.float64)])
    B = torch.cat([Xf @ W.T, r * W.T])
    ref = torch.linalg.lstsq(A, B).solution.T
    torch.testing.assert_close(got, ref, rtol=1e-7, atol=1e-8)


def test_float_target_is_the_weight_when_the_inputs_agree():
    g = torch.Generator().manual_seed(1)
    W, X = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(30, 7, generator=g, dtype=torch.float64)
    H = 2 / 30 * X.T @ X
    torch.testing.assert_close(float_target_weight(W, H, H.clone()), W, rtol=0, atol=1e-12)


def test_float_target_refuses_bad_shapes_and_damp():
    H = torch.eye(3)
    with pytest.raises(QBayesError, match="must both be"):
        float_target_weight(torch.zeros(2, 3), H, torch.eye(4))
    with pytest.raises(QBayesError, match="positive damp"):
        float_target_weight(torch.zeros(2, 3), H, H, damp=0.0)


def test_cross_moment_of_a_stream_with_itself_is_its_second_moment():
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(3, 11, 6, generator=g, dtype=torch.float64) for _ in range(4)]
    a, b = InputSecondMoment(6, dtype=torch.float64), InputCrossMoment(6, dtype=torch.float64)
    for x in xs:
        a.update(x)
        b.update(x, x)
    torch.testing.assert_close(a.H, b.C)
    with pytest.raises(QBayesError, match="do not match"):
        b.update(torch.zeros(2, 6), torch.zeros(3, 6))


def naive_float_targets(model, ids, spec, batch):
    """For every stage: run a float copy and the partly quantized model end to end, pair their
    inputs of the stage, and solve GPTQ on the float-target weight."""
    float_model = copy.deepcopy(model)
    fmods = dict(float_model.named_modules())
    codes = {}
    with torch.no_grad():
        for bname, block in adapter_for(model).blocks():
            linears = find_linears(block)
            from qbayes.calibrate import discover_stages
            inputs = []
            h = block.register_forward_pre_hook(lambda m, a, k: inputs.append((a, dict(k))), with_kwargs=True)
            model(input_ids=ids[:batch], use_cache=False)
            h.remove()
            stages, _ = discover_stages(block, linears, *inputs[0])
            for stage in stages:
                got = {"q": [], "f": []}
                hq = linears[stage[0]].register_forward_pre_hook(lambda m, a: got["q"].append(a[0]))
                hf = fmods[f"{bname}.{stage[0]}"].register_forward_pre_hook(lambda m, a: got["f"].append(a[0]))
                for ids_b in ids.split(batch):
                    model(input_ids=ids_b, use_cache=False)
                    float_model(input_ids=ids_b, use_cache=False)
                hq.remove()
                hf.remove()
                Hs, Cs = InputSecondMoment(linears[stage[0]].in_features), InputCrossMoment(linears[stage[0]].in_features)
                for xf, xq in zip(got["f"], got["q"]):
                    Hs.update(xq)
                    Cs.update(xf, xq)
                W = torch.cat([linears[n].weight for n in stage])
                qw = gptq(float_target_weight(W, Hs.H, Cs.C, 0.01), Hs.H, spec)
                for n, p in zip(stage, qw.split_rows([linears[n].out_features for n in stage])):
                    linears[n].weight.data = p.dequantize()
                    codes[f"{bname}.{n}"] = p.codes
    return codes


def test_two_stream_driver_matches_naive_float_targets(calib_ids):
    m = tiny_llama()
    ref_model, plain = copy.deepcopy(m), copy.deepcopy(m)
    spec = QuantSpec(3, 16, clip="minmax")
    quantize_(m, spec, "gptq", calib_ids, batch_size=2, float_dtype="float32", progress=False, float_targets=True)
    quantize_(plain, spec, "gptq", calib_ids, batch_size=2, float_dtype="float32", progress=False)
    ref = naive_float_targets(ref_model, calib_ids, spec, batch=2)
    got = {n: mod for n, mod in m.named_modules() if isinstance(mod, QuantLinear)}
    other = {n: mod for n, mod in plain.named_modules() if isinstance(mod, QuantLinear)}
    assert set(got) == set(ref)
    for n, mod in got.items():
        assert torch.equal(unpack(mod.qweight, 3, mod.in_features), ref[n]), n
    changed = sum(not torch.equal(got[n].qweight, other[n].qweight) for n in got)
    assert changed >= len(got) // 2  # the option really changes the codes downstream
    assert m.qbayes_config["options"] == {"float_targets": True}


def test_float_targets_is_a_gptq_option_only(calib_ids):
    with pytest.raises(QBayesError, match="takes no option"):
        quantize_(tiny_llama(), QuantSpec(4, 16), "rtn", calib_ids, progress=False, float_targets=True)
