"""benchmarks/adjoint_precision.py: the verdicts on synthetic rows built to meet and to miss
(at every N and at the N bfloat16 can resolve), the order fit, the page; one real
measurement at a small N."""

from __future__ import annotations

import math

import pytest

from benchmarks import adjoint_precision as ap
from benchmarks import record


def _rows(integrator, bf16_of, floor=1e-3):
    """float32 error 1/N^order, float64 the same, bfloat16 ``bf16_of(n, float32)``."""
    rows = []
    for n in ap.NS:
        f32 = 1.0 / n ** ap.ORDERS[integrator]
        rows.append({"integrator": integrator, "n": n, "float64": f32, "float32": f32,
                     "mixed_bfloat16": bf16_of(n, f32), "bfloat16_floor": floor})
    return rows


def _claims(rows):
    return {c["id"]: c for c in ap.claims(rows)}


def test_a_bfloat16_curve_on_the_float32_one_meets_both_targets_and_the_order_is_fitted():
    claims = _claims(_rows("heun", lambda n, f32: 1.5 * f32, floor=1e-6))
    assert claims["adjoint-precision.heun.all-n"]["verdict"] == "met"
    assert claims["adjoint-precision.heun.resolvable-n"]["verdict"] == "met"
    assert claims["adjoint-precision.heun.all-n"]["value"] == pytest.approx(1.5)
    assert claims["adjoint-precision.heun.float32-order"]["value"] == pytest.approx(-2.0)
    record.check_claims(list(claims.values()))


def test_a_curve_flattened_by_the_bfloat16_floor_misses_at_every_n_but_not_where_resolvable():
    floor = 2e-3  # float32 Heun error 1/N²: above 2 × floor for N = 4, 8 only
    claims = _claims(_rows("heun", lambda n, f32: max(f32, floor), floor=floor))
    every = claims["adjoint-precision.heun.all-n"]
    assert every["verdict"] == "missed"
    assert every["high"] == pytest.approx(floor * 64**2)  # at N = 64
    resolvable = claims["adjoint-precision.heun.resolvable-n"]
    assert resolvable["verdict"] == "met" and "(4, 8)" in resolvable["claim"]


def test_a_bfloat16_curve_far_above_float32_where_resolvable_misses():
    claims = _claims(_rows("euler", lambda n, f32: 5 * f32, floor=1e-5))
    assert claims["adjoint-precision.euler.resolvable-n"]["verdict"] == "missed"
    assert claims["adjoint-precision.euler.resolvable-n"]["value"] == pytest.approx(5.0)


def test_no_resolvable_n_leaves_the_target_undecided():
    claims = _claims(_rows("euler", lambda n, f32: f32, floor=1.0))
    c = claims["adjoint-precision.euler.resolvable-n"]
    assert c["verdict"] == "not decided" and c["value"] is None and "none" in c["claim"]


def test_page_has_the_table_the_figure_and_every_verdict():
    rows = _rows("euler", lambda n, f32: f32) + _rows("heun", lambda n, f32: 3 * f32, 1e-9)
    rec = record.RunRecord(command="python -m benchmarks.adjoint_precision", date="d",
                           machine="m", cores=2, load_before=0.1, allow_load=False)
    text = "\n".join(ap.page(rec, rows, "adjoint_precision.png"))
    assert "| heun | 64 |" in text
    assert "![adjoint error by precision](adjoint_precision.png)" in text
    assert text.count("**met**") == 2 and text.count("**missed**") == 2


def test_one_real_measurement_orders_the_precisions():
    """Euler, N = 4: every precision's adjoint error is that of the scheme (the same to a few
    percent in float64 and float32), and bfloat16's own gradient error is far above float32
    rounding."""
    row = ap.measure("euler", 4)
    assert 1e-3 < row["float64"] < 1.0
    assert math.isclose(row["float32"], row["float64"], rel_tol=0.05)
    assert 1e-5 < row["bfloat16_floor"] < 0.1
    assert row["mixed_bfloat16"] > 0


def _exact_row(name, bf16_error, step_size=None):
    report = {"max_error": bf16_error, "model_error": bf16_error / 2,
              "reconstruction": 1e-7, "stages": 3, "h": [1.0, 1.0, 1.0], "stream": "float64"}
    return {"model": name, "step_size": step_size, "float32": {**report, "max_error": 1e-6},
            "mixed_bfloat16": report}


def test_exact_families_are_held_to_1e_3_under_mixed_bfloat16():
    rows = [_exact_row("revheun_resnet56", 4e-4), _exact_row("revnet110", 2e-3),
            _exact_row("revheun_resnet56", 3e-2, "ode")]
    claims = {c["id"]: c for c in ap.exact_claims(rows)}
    assert claims["adjoint-precision.revheun_resnet56.mixed-bfloat16"]["verdict"] == "met"
    assert claims["adjoint-precision.revnet110.mixed-bfloat16"]["verdict"] == "missed"
    ode = claims["adjoint-precision.revheun_resnet56-ode.mixed-bfloat16"]
    assert ode["verdict"] == "missed" and "(step_size=ode)" in ode["claim"]
    record.check_claims(list(claims.values()))
    text = "\n".join(ap.exact_section(rows))
    assert ("| `revnet110` | 1, 1, 1 | 1.0e-06 | 1.0e-07 | float64 | 2.0e-03 | 1.0e-03 | "
            "1.0e-07 |") in text
    assert text.count("**met**") == 1 and text.count("**missed**") == 2


@pytest.mark.bfloat16
def test_one_real_exact_family_under_both_precisions():
    """revheun_resnet20 at full size: exact in float32, and within the target under
    mixed_bfloat16 (the float32 residual stream)."""
    row = ap.measure_exact("revheun_resnet20")
    assert row["float32"]["max_error"] < 1e-4 and row["float32"]["stages"] == 3
    assert row["mixed_bfloat16"]["max_error"] <= ap.EXACT_TARGET
    assert row["mixed_bfloat16"]["stream"] == "float64" and row["float32"]["stream"] == "float32"
