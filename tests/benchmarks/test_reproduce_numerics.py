"""kode reproduce, experiments 1–2: smooth weights from zero init, adjoint error vs depth.

Tiny sizes, float64: the numerical claims themselves (not just that the code runs), and that
each section's text is computed from its result.
"""

import copy

import numpy as np
import pytest

from benchmarks.reproduce import adjoint_error, smooth_weights
from benchmarks.reproduce.common import Context, fmt, loglog_slope


def test_zero_init_weights_are_smooth_and_iid_init_stays_rough():
    zero = {n: smooth_weights.train_linear_resnet(n, seed=0, gd_steps=80) for n in (8, 32)}
    iid = {n: smooth_weights.train_linear_resnet(n, seed=0, gd_steps=80, init_std=0.5)
           for n in (8, 32)}
    for r in (*zero.values(), *iid.values()):
        assert r["losses"][-1] < 1e-3 * r["losses"][0]  # training actually fits the map
        assert r["A"].shape[1:] == (2, 2)
    # Smooth: max|ΔA| / max|A| = O(1/N), so 4× the depth gives ~4× smaller roughness.
    assert zero[32]["ratio"] < zero[8]["ratio"] / 3
    assert zero[32]["n_ratio"] == pytest.approx(zero[8]["n_ratio"], rel=0.25)
    # The i.i.d. initial noise is not removed by training: no decay with N.
    assert iid[32]["max_diff"] > 0.5 * iid[8]["max_diff"]
    assert iid[32]["max_diff"] > 20 * zero[32]["max_diff"]


def test_smoothness_measures():
    a = np.zeros((4, 2, 2))
    a[:, 0, 1] = [0.0, 1.0, 2.0, 4.0]
    m = smooth_weights.smoothness(a)
    assert (m["max_a"], m["max_diff"], m["ratio"], m["n_ratio"]) == (4.0, 2.0, 0.5, 2.0)


@pytest.mark.parametrize("integrator, lo, hi", [("euler", -1.25, -0.75), ("heun", -4.0, -1.75)])
def test_adjoint_error_slope_with_smooth_weights(integrator, lo, hi):
    ns = [4, 8, 16]
    errors = [adjoint_error.gradient_error(n, integrator, "smooth", seed=0) for n in ns]
    assert lo <= loglog_slope(ns, errors) <= hi, errors


def test_reversible_heun_is_exact_and_classic_step_is_not():
    for weights in ("iid", "smooth"):
        assert adjoint_error.gradient_error(8, "reversible_heun", weights, seed=1) <= 1e-10
    # h = 1 with i.i.d. weights: the reversal is far off, the gradient with it.
    assert adjoint_error.gradient_error(8, "euler", "iid", seed=0, step_size=1.0) > 0.1


def test_smooth_weights_sample_one_function():
    coarse = adjoint_error.residual_weights(4, "heun", "smooth", seed=3)
    fine = adjoint_error.residual_weights(8, "heun", "smooth", seed=3)
    assert len(coarse) == 5 and len(fine) == 9  # Heun: N + 1 functions on the grid
    for n in range(5):  # t = n/4 = 2n/8: the same point of W(t)
        np.testing.assert_allclose(coarse[n][0], fine[2 * n][0])
    iid = adjoint_error.residual_weights(8, "euler", "iid", seed=3)
    assert len(iid) == 8 and not np.allclose(iid[0][0], iid[1][0])


def _ctx(tmp_path, name):
    return Context(name=name, quick=True, seeds=[0], out=tmp_path, command="pytest")


def test_smooth_weights_run_and_report(tmp_path, monkeypatch):
    monkeypatch.setattr(smooth_weights, "QUICK", {"ns": [6, 12], "gd_steps": 40})
    monkeypatch.setattr(smooth_weights, "MAIN_N", 12)
    result = smooth_weights.run(_ctx(tmp_path, "smooth_weights"))
    assert (tmp_path / result["figure"]).stat().st_size > 10_000
    text = "\n".join(smooth_weights.report(result))
    zero12 = next(r for r in result["runs"] if r["init"] == "zero" and r["n"] == 12)
    assert f"max|A_{{n+1}} − A_n| = {fmt(zero12['max_diff'])}" in text
    assert f"slope {fmt(result['slopes']['zero'])}" in text
    # The exact verdict ("agrees with the paper" is also a substring of "disagrees with the
    # paper's"): the measured slope (≈ −1) agrees, a flat one disagrees.
    assert "This agrees with the paper." in text and "disagrees" not in text
    rough = copy.deepcopy(result)
    rough["slopes"]["zero"] = -0.2
    rough_text = "\n".join(smooth_weights.report(rough))
    assert "**This disagrees with the paper's O(1/N) claim**" in rough_text
    assert "This agrees with the paper." not in rough_text


def test_adjoint_error_run_and_report(tmp_path, monkeypatch):
    monkeypatch.setattr(adjoint_error, "QUICK_NS", [4, 8])
    result = adjoint_error.run(_ctx(tmp_path, "adjoint_error"))
    assert (tmp_path / result["figure"]).stat().st_size > 10_000
    text = "\n".join(adjoint_error.report(result))
    series = {s["key"]: s for s in result["series"]}
    assert {"euler/iid/h=1", "heun/iid/h=1"} <= set(series)
    for key in ("euler/smooth", "heun/smooth"):
        for e in series[key]["error"]:
            assert adjoint_error.sci(e) in text
        assert f"{series[key]['slope']:.2f}" in text
    assert "3.2e-02" in text  # the reference column, at N = 4
    assert "disagrees" not in text
    flat = copy.deepcopy(result)
    for s in flat["series"]:
        if s["key"] == "heun/smooth":
            s["slope"] = -1.0
    assert "disagrees with the claim" in "\n".join(adjoint_error.report(flat))
