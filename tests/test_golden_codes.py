"""The refactor of issue 12 (adapters, one curvature collector, format registry) must not change
any code a solver produces: the packed codes, scales and zero-points on the tiny test models are
compared bit for bit with hashes made before it (tests/golden/gptq_codes.py)."""
import json

import pytest

from tests.golden.gptq_codes import CASES, HERE, compute

GOLDEN = json.loads(HERE.read_text())


@pytest.mark.parametrize("case", sorted(CASES))
def test_codes_bit_identical_to_golden(case):
    got = compute(case)
    want = GOLDEN[case]
    assert sorted(got) == sorted(want)
    diff = [k for k in want if got[k] != want[k]]
    assert not diff, f"{case}: codes/scales/zeros changed in {diff[:5]}"
