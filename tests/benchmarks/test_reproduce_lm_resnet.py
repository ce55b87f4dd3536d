"""Experiment 5 of ``kode reproduce``: LM modified equation, stability interval, report."""

import math

import numpy as np
import pytest

from benchmarks.reproduce import lm_resnet as lm
from benchmarks.reproduce.common import Context

NS = (64, 128, 256, 512)


def test_lm_solve_matches_closed_form_of_two_roots():
    # u_n = c1 ζ1^n + c2 ζ2^n with ζ the roots of ζ² − (1−k+hλ)ζ − k.
    k, hl = 0.4, 0.05
    roots = np.roots([1.0, -(1 - k + hl), -k])
    c = np.linalg.solve(np.vander(roots, 2, increasing=True).T, [1.0, 1.0 + hl])
    expected = [float(np.real(c @ roots**n)) for n in range(20)]
    assert lm.lm_solve(k, hl, 19) == pytest.approx(expected, rel=1e-12)


def test_modified_rate_is_root_and_tends_to_leading_order():
    for k in (-0.5, 0.3, 1.0):
        h = 0.01
        mu = lm.modified_rate(k, 1.0, h)
        assert (1 - k) * h / 2 * mu**2 + (1 + k) * mu == pytest.approx(1.0, rel=1e-12)
        assert lm.modified_rate(k, 1.0, 1e-9) == pytest.approx(1 / (1 + k), rel=1e-7)


@pytest.mark.parametrize("k", [-0.5, 0.5])
def test_orders_first_to_leading_second_to_modified(k):
    orders = lm.fitted_orders(NS, lm.modified_equation_errors(k, NS), fit_from=NS[0])
    assert orders["lead_euler"] == pytest.approx(1.0, abs=0.15)
    assert orders["mod_physical"] == pytest.approx(2.0, abs=0.15)
    assert orders["rate_euler"] == pytest.approx(2.0, abs=0.15)
    # The Euler first step offsets the slow mode's amplitude by O(h): first order only.
    assert orders["mod_euler"] == pytest.approx(1.0, abs=0.15)


def test_euler_start_amplitude_offset_is_predicted():
    k, n = 0.5, 1024
    errors = lm.modified_equation_errors(k, (n,))
    predicted = abs(lm.amplitude_offset(k, lm.LAMBDA * lm.HORIZON / n))
    assert errors["mod_euler"][0] == pytest.approx(predicted, rel=0.05)


def test_growth_bounded_exactly_on_stability_interval():
    stable, unstable = [-0.9, 0.0, 0.9, 1.0], [-1.0, 1.1, -1.2]
    ks = stable + unstable
    short, long = lm.perturbation_log_growth(ks, 200), lm.perturbation_log_growth(ks, 2000)
    growth = long - short
    assert np.all(growth[: len(stable)] < math.log10(2.0))
    assert np.all(growth[len(stable):] > math.log10(5.0))
    # k = −1: double root 1, linear growth e_n = n.
    assert long[len(stable)] == pytest.approx(math.log10(2000), abs=1e-9)
    assert [lm.root_condition(k) for k in ks] == [True] * 4 + [False] * 3


def test_growth_does_not_overflow_for_large_k():
    g = lm.perturbation_log_growth([1.5, -1.5], 5000)
    assert np.all(np.isfinite(g))
    assert g == pytest.approx(4998 * math.log10(1.5), rel=1e-3)


def test_stability_sweep_finds_the_interval():
    ks = [round(-1.3 + 0.1 * i, 10) for i in range(27)]
    s = lm.stability_sweep(ks, (300, 3000))
    assert s["mismatches"] == []
    assert s["bounded_range"] == [-0.9, 1.0]


def _fake_training() -> dict:
    runs = []
    for seed, (acc_r, acc_lm) in enumerate([(0.95, 0.96), (0.94, 0.97)]):
        runs.append({"model": "resnet", "depth": 20, "seed": seed, "test_accuracy": acc_r,
                     "params": 100, "cpu_s": 1.0, "k_labels": [], "k_init": [], "k_final": []})
        runs.append({"model": "lm_resnet", "depth": 20, "seed": seed, "test_accuracy": acc_lm,
                     "params": 102, "cpu_s": 1.0, "k_labels": ["stage1/lm_k_1", "stage2/lm_k_0"],
                     "k_init": [-0.05, -0.02], "k_final": [-0.3 - seed, 0.2]})
    t = {"depths": [20], "epochs": 3, "batch_size": 64, "lr": 0.05, "schedule": "step",
         "momentum": 0.9, "weight_decay": 5e-4, "decay_lm_k": False, "train_size": 1437,
         "test_size": 360, "runs": runs}
    t["accuracy"] = lm.accuracy_summary(t)
    t["k"] = lm.k_summary(t)
    return t


def test_summaries_of_training():
    t = _fake_training()
    (row,) = t["accuracy"]
    assert row["resnet"][0] == pytest.approx(0.945)
    assert row["difference"][0] == pytest.approx(0.02)
    assert row["difference"][1] == pytest.approx(math.sqrt(2) * 0.01)
    k = t["k"]
    assert (k["min"], k["max"], k["count"]) == (pytest.approx(-1.3), pytest.approx(0.2), 4)
    assert k["in_stability"] == 3 and k["in_published"] == 4 and k["in_init_range"] == 0


def test_report_renders_the_numbers_and_figures(tmp_path):
    ctx = Context(name="lm_resnet", quick=True, seeds=[0, 1], out=tmp_path, command="test")
    errors = {str(k): lm.modified_equation_errors(k, NS) for k in (-0.5, 0.5)}
    modified = {"lambda": 1.0, "horizon": 1.0, "ks": [-0.5, 0.5], "ns": list(NS),
                "fit_from": NS[0], "errors": errors,
                "orders": {k: lm.fitted_orders(NS, e, NS[0]) for k, e in errors.items()},
                "amplitude_predicted": {"-0.5": 1e-3, "0.5": 2e-4}}
    modified["figure"] = lm.plot_modified(ctx, modified)
    stability = lm.stability_sweep([round(-1.5 + 0.1 * i, 10) for i in range(31)], (100, 1000))
    stability["figure"] = lm.plot_stability(ctx, stability)
    training = _fake_training()
    training["figure"] = lm.plot_learned_k(ctx, training)
    text = "\n".join(lm.report({"modified": modified, "stability": stability,
                                "training": training}))
    for name in (modified["figure"], stability["figure"], training["figure"]):
        assert (tmp_path / name).stat().st_size > 10_000
        assert f"]({name})" in text
    order = modified["orders"]["0.5"]["mod_physical"]
    assert f"{order:.2f}" in text
    assert "94.50 ± 0.71" in text  # ResNet mean ± std from the fake runs
    assert "+2.00 ± 1.41" in text and "not significant over 2 seed(s)" in text
    assert "+7.2 test images" in text and "1437 train / 360 test" in text
    assert "range [-1.300, 0.200]" in text
    assert "Bounded on the grid for k in [-0.9, 1]" in text
    assert "LM-ResNet20: 8.33%" in text


def test_lm_k_values_reads_every_lm_step_of_a_zoo_model():
    import zoo

    lm_model = zoo.create_model("lm_resnet20", depth=20, input_shape=(8, 8, 1), classes=10)
    labels, values = lm.lm_k_values(lm_model)
    # 3 blocks per stage: stage 1's first step is Euler, stages 2–3 start with a transition.
    assert labels == ["stage1/lm_k_1", "stage1/lm_k_2", "stage2/lm_k_0", "stage2/lm_k_1",
                      "stage3/lm_k_0", "stage3/lm_k_1"]
    assert all(lm.K_INIT_RANGE[0] <= k <= lm.K_INIT_RANGE[1] for k in values)
    stored = [lm_model.get_layer(s).integrator_variables[0].numpy() for s in ("stage1",
                                                                           "stage2", "stage3")]
    assert values == [float(k) for k in np.concatenate(stored)]  # entry i is step N − K + i
    plain = zoo.create_model("resnet20", depth=14, input_shape=(8, 8, 1), classes=10)
    assert lm.lm_k_values(plain) == ([], [])


def test_paired_difference_test_uses_student_t():
    # t = 0.83 / (0.28/√3) ≈ 5.1 > t_{0.975, 2} ≈ 4.30; 0.93 / (0.70/√3) ≈ 2.3 is not.
    assert lm.paired_difference_significant(0.0083, 0.0028, 3)
    assert not lm.paired_difference_significant(0.0093, 0.0070, 3)
    assert not lm.paired_difference_significant(0.01, 0.001, 1)
