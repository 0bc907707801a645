"""The parity harness's float64 rule (parity_tests/compare.py): a miss against the float32 reference passes
only on a tensor whose recorded reference is itself further than the tolerance from float64, and only if
ours is no further from float64 than X64_FACTOR times the reference's worst step. Never a looser tolerance.
"""

from __future__ import annotations

import numpy as np

from lopt_bridge.parity_tests.compare import X64_FACTOR, CaseResult
from lopt_bridge.parity_tests.report import format_table


def _case(errors, ours64, ref64) -> CaseResult:
    e = np.array(errors, dtype=np.float64).reshape(-1, 2)
    return CaseResult(
        "c", "f", "a", ["ok", "ill"], e,
        x64_ours=np.array(ours64, dtype=np.float64).reshape(e.shape),
        x64_ref=np.array(ref64, dtype=np.float64).reshape(e.shape),
    )  # fmt: skip


def test_a_miss_on_an_ill_conditioned_tensor_passes_only_when_ours_is_as_close_to_float64():
    # tensor "ill": the reference is 2e-4 from float64 at step 1; ours misses the reference by 7e-5.
    good = _case([1e-7, 7e-5, 2e-7, 1e-6], [1e-7, 2.5e-4, 1e-7, 1e-6], [1e-7, 1e-6, 1e-7, 2e-4])
    assert good.passed and good.x64_accepted()[0, 1] and not good.x64_accepted()[1, 1]
    s = good.x64_summary()["ill"]
    assert s["accepted"] and s["ours_vs_float64"] == 2.5e-4 and s["reference_vs_float64"] == 2e-4
    assert s["missed_steps"] == 1 and "ok" not in good.x64_summary()
    assert "PASS (float64 rule)" in format_table([good])
    assert good.to_json()["float64_rule"]["ill"]["ratio"] == 1.25
    # Ours further from float64 than X64_FACTOR x the reference's worst step: a failure.
    far = _case([0, 7e-5, 0, 0], [0, X64_FACTOR * 2e-4 * 1.01, 0, 0], [0, 1e-6, 0, 2e-4])
    assert not far.passed and not far.x64_summary()["ill"]["accepted"]
    # A well-conditioned tensor (reference within the tolerance of float64) gets no allowance at all.
    well = _case([0, 2e-5, 0, 0], [0, 1e-6, 0, 0], [0, 9e-6, 0, 8e-6])
    assert not well.passed
    # A miss on the well-conditioned tensor is not excused by the other tensor's floor.
    other = _case([2e-5, 0, 0, 0], [1e-6, 0, 0, 0], [0, 2e-4, 0, 0])
    assert not other.passed
    # Without a float64 replay, or for other dtypes, nothing changes.
    plain = CaseResult("c", "f", "a", ["ok", "ill"], np.array([[0.0, 7e-5]]))
    assert not plain.passed and plain.x64_summary() == {}
    bf = _case([0, 7e-5, 0, 0], [0, 1e-6, 0, 0], [0, 2e-4, 0, 0])
    bf.dtype = "bfloat16"
    assert not bf.x64_accepted().any()
    nan = _case([0, np.nan, 0, 0], [0, np.nan, 0, 0], [0, 2e-4, 0, 0])
    assert not nan.passed
