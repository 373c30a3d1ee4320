"""The refactor of issue 12 (adapters, one curvature collector, format registry) must not change
any code a solver produces: the unpacked codes, scales and zero-points on the tiny test models are
compared with those made before it (tests/golden/gptq_codes.py says when bit-identity is required
of every block and when only of the first)."""
import pytest

from tests.golden.gptq_codes import CASES, compute, differences, first_block, load, machine

MADE_ON, GOLDEN = load()


@pytest.mark.parametrize("case", sorted(CASES))
def test_codes_bit_identical_to_golden(case):
    exact_all = machine() == MADE_ON
    diff = differences(compute(case), GOLDEN[case], exact_all)
    where = "" if exact_all else f" (first block only: golden made on {MADE_ON}, this is {machine()})"
    assert not diff, f"{case}: codes/scales/zeros changed in {diff[:5]}{where}"


def test_golden_covers_both_blocks_and_every_tensor_kind():
    for case, tensors in GOLDEN.items():
        assert any(first_block(k) for k in tensors) and not all(first_block(k) for k in tensors), case
        kinds = {k.rsplit(".", 1)[1] for k in tensors}
        assert {"codes", "scales"} <= kinds, case


@pytest.mark.parametrize("exact_all", [True, False])
def test_the_comparison_catches_a_real_change(exact_all):
    """A 1.5x damping is a small algorithmic change; even the first-block-only comparison sees it."""
    case = "llama-gptq-w3g16-sym-minmax"
    assert differences(compute(case, damp=0.015), GOLDEN[case], exact_all)
