"""Experiment 4 of ``kode reproduce`` (depth vs accuracy with the adjoint), at tiny size."""

from __future__ import annotations

import pytest

from benchmarks.reproduce import depth_accuracy as da
from benchmarks.reproduce.common import Context


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory):
    """The experiment's own run() on depths 2 and 4, one seed, two epochs."""
    out = tmp_path_factory.mktemp("depth_accuracy")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(da, "QUICK_DEPTHS", [2, 4])
        mp.setattr(da, "EPOCHS", 2)
        ctx = Context(name="depth_accuracy", quick=True, seeds=[0], out=out,
                      command="pytest tiny")
        return da.run(ctx), out


def test_every_run_has_its_fields(tiny_result):
    result, _ = tiny_result
    runs = result["runs"]
    assert {(r["integrator"], r["gradient"], r["depth"]) for r in runs} == {
        (i, g, d) for i in da.INTEGRATORS for g in da.MODES for d in (2, 4)}
    for r in runs:
        assert 0.0 <= r["test_accuracy"] <= 1.0
        assert r["grad_error_init"] > 0
        # Only adjoint-trained models are re-checked after training.
        assert (r["grad_error_trained"] is not None) == (r["gradient"] == "adjoint")
        # Heun holds N functions for N − 1 steps.
        assert r["steps"] == (r["depth"] if r["integrator"] == "euler" else r["depth"] - 1)


def test_backprop_training_beats_chance(tiny_result):
    result, _ = tiny_result
    for r in result["runs"]:
        if r["gradient"] == "backprop":
            assert r["test_accuracy"] > 0.5, r  # chance is 0.1


def test_init_error_is_shared_by_both_gradient_modes(tiny_result):
    # Same seed, same initial weights: the adjoint's error at init cannot depend on the mode.
    result, _ = tiny_result
    by_key = {}
    for r in result["runs"]:
        by_key.setdefault((r["integrator"], r["depth"]), set()).add(r["grad_error_init"])
    assert all(len(errors) == 1 for errors in by_key.values())


def test_report_renders_the_result(tiny_result):
    result, out = tiny_result
    text = "\n".join(da.report(result))
    assert (out / result["figure"]).exists()
    assert f"]({result['figure']})" in text
    for row in result["summary"]:
        assert f"{100 * row['acc_mean']:.1f} ± {100 * row['acc_std']:.1f}" in text
    for i in da.INTEGRATORS:
        assert f"{100 * da._gap(result, i, 2):.1f} points" in text
    # The verdicts follow this run's numbers (the exact texts: test_findings_verdicts).
    approaches = all(da._gap(result, i, 4) < da._gap(result, i, 2) for i in da.INTEGRATORS) \
        and all(da.catch_up_depth(result, i) is not None for i in da.INTEGRATORS)
    assert (APPROACHES_AGREES in text) == approaches
    assert (APPROACHES_DOES_NOT_HOLD in text) == (not approaches)


APPROACHES_AGREES = ("- The adjoint approaches backprop as depth grows: **agrees** with "
                     "Sander et al. (Fig. 3c).")
APPROACHES_DOES_NOT_HOLD = ("- The adjoint approaches backprop as depth grows: **does not "
                            "hold** in this run, unlike Sander et al. (Fig. 3c).")
FEWER_LAYERS = "- Heun reaches backprop with fewer layers than Euler: "


def _summary_result(adjoint_accuracy: dict) -> dict:
    """A result whose backprop accuracy is 0.9 everywhere and whose adjoint accuracies are
    ``adjoint_accuracy[integrator]`` at depths 2, 4, 8."""
    summary = []
    for integrator in da.INTEGRATORS:
        for depth, acc in zip((2, 4, 8), adjoint_accuracy[integrator], strict=True):
            for gradient, a in (("backprop", 0.9), ("adjoint", acc)):
                summary.append({"integrator": integrator, "gradient": gradient, "depth": depth,
                                "acc_mean": a, "acc_std": 0.0, "err_init": 0.1 / depth,
                                "err_trained": 0.1 / depth})
    return {"depths": [2, 4, 8], "summary": summary, "horizon": 4.0}


def test_findings_verdicts():
    """Inputs built to agree with both claims and to disagree with both: the exact verdicts."""
    agree = da.findings(_summary_result({"euler": (0.5, 0.8, 0.9), "heun": (0.6, 0.9, 0.9)}))
    assert APPROACHES_AGREES in agree and APPROACHES_DOES_NOT_HOLD not in agree
    assert (FEWER_LAYERS + "**agrees**: Heun's adjoint catches up at N = 4, Euler's at N = 8."
            ) in agree
    # Euler catches up at N = 4, Heun never does, and Heun's gap grows with depth.
    disagree = da.findings(_summary_result({"euler": (0.5, 0.9, 0.9),
                                            "heun": (0.8, 0.7, 0.6)}))
    assert APPROACHES_DOES_NOT_HOLD in disagree and APPROACHES_AGREES not in disagree
    assert (FEWER_LAYERS + "**disagrees** with the paper: Heun's adjoint catches up at "
            "N = None, Euler's at N = 4 (None: not within the sweep), so Heun does not need "
            "fewer layers here.") in disagree


def test_adjoint_error_falls_with_depth_and_heun_beats_euler():
    """At init (ODE scaling, h = T/steps): the error shrinks as N grows, and at N = 16 Heun's
    reversal (local error O(h³)) gives smaller gradient errors than Euler's (O(h²))."""
    gx, gy = da._guard_batch(0)
    errors = {}
    for integrator in da.INTEGRATORS:
        for depth in (4, 16):
            model = da.build_model(integrator, depth, "adjoint", seed=0)
            errors[integrator, depth] = da.stage_gradient_error(model, gx, gy)
    for integrator in da.INTEGRATORS:
        assert errors[integrator, 16] < 0.5 * errors[integrator, 4], errors
    assert errors["heun", 16] < errors["euler", 16], errors


def test_catch_up_depth():
    def cell(integrator, gradient, depth, acc):
        return {"integrator": integrator, "gradient": gradient, "depth": depth,
                "acc_mean": acc, "acc_std": 0.0}

    summary = [cell("euler", "backprop", d, 0.9) for d in (2, 4, 8)]
    summary += [cell("euler", "adjoint", 2, 0.5), cell("euler", "adjoint", 4, 0.9),
                cell("euler", "adjoint", 8, 0.7)]
    # Matching at N = 4 does not count when N = 8 falls behind again.
    assert da.catch_up_depth({"depths": [2, 4, 8], "summary": summary}, "euler") is None
    summary[-1] = cell("euler", "adjoint", 8, 0.9)
    assert da.catch_up_depth({"depths": [2, 4, 8], "summary": summary}, "euler") == 4
