"""The on-paper GPU traffic model (benchmarks/gpu_on_paper.py) agrees with what the kernels do.

The Triton kernels never ran on a GPU here, so the H100 / H200 figures in
benchmarks/RESULTS.md are derived from an analytic byte count. This test runs the same
kernels in the Triton CPU interpreter with every ``tl.load`` / ``tl.store`` intercepted and
requires the grids and the per-argument byte counts (requested and distinct, masked-out
lanes excluded) to equal the model's exactly, on small shapes that hit the edge cases:
partial tiles, an empty union, a segment spanning two token blocks, padding blocks, with
and without a K split.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytest.importorskip("triton.runtime.interpreter")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_on_paper as gp  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")


@pytest.mark.parametrize("case", gp.CONFIRM_CASES, ids=lambda c: f"H{c[0]}-E{c[1]}-D{c[2]}-L{'.'.join(map(str, c[3]))}")
def test_interpreter_traffic_matches_model(case):
    got = gp.run_case(*case)
    measured, model = got["measured"], got["model"]
    names = [m.kernel for m in model]
    assert [m.kernel for m in measured] == names
    assert names == ["_router_logits_kernel", "_router_norm_kernel", "_segment_union_kernel",
                     "_sparse_up_kernel", "_sparse_down_kernel"]  # fmt: skip
    for m, a in zip(measured, model, strict=True):
        assert m.grid == a.grid, m.kernel
        assert m.loads == a.loads, m.kernel
        assert m.stores == a.stores, m.kernel
        assert m.distinct_loads == a.distinct_loads, m.kernel
        assert m.distinct_stores == a.distinct_stores, m.kernel
    up = measured[3]
    # The hook really saw the expert weights: exactly the active experts' rows, once each.
    n_active = len({e for n, u in zip(case[3], got["unions"], strict=True) if n for e in u})
    assert up.distinct_loads.get("w_ptr", 0) == n_active * case[2] * case[0] * 2


def test_interpreter_hook_is_removed():
    from triton.runtime import interpreter as ti

    before = (ti.GridExecutor.__call__, ti.InterpreterBuilder.create_masked_load)
    with gp.interpreter_traffic():
        assert ti.InterpreterBuilder.create_masked_load is not before[1]
    assert (ti.GridExecutor.__call__, ti.InterpreterBuilder.create_masked_load) == before


def test_dense_and_weight_share_figures():
    # XLarge, one token, 70% idle: the expert weights are 17/56 of dense's, and they are
    # most of what the sparse path loads.
    row = gp.sweep_row("1.2B XLarge", 1, 1, 0.7)
    H, E, D = gp.SHAPES["1.2B XLarge"]
    assert row.active_per_segment == 17
    assert row.dense_bytes > 2 * E * D * H * 2
    assert 17 / 56 < row.sparse_bytes / row.dense_bytes < 0.35
    assert row.weight_fraction > 0.9
