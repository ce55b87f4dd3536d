"""refine(model, m): m untied steps of h/m per Euler step (Sander et al., Table 2)."""

import math
import os

import keras
import numpy as np
import pytest

import zoo
from kode.errors import KodeError
from kode.layers.stage import IntegratorStage
from kode.tools.guard import check_gradients
from kode.tools.refine import AUTO_FACTORS, check_refine, choose_factor, refine, refine_report

WIDTH = 6


def _stage(model):
    return next(lay for lay in model.layers if isinstance(lay, IntegratorStage))


def _tied_model(steps: int = 4, seed: int = 0) -> keras.Model:
    """Dense tanh residual function shared by all ``steps`` steps (weights constant in depth,
    the smooth case), h = 1/N, then a softmax head; float64 so the trends are not rounding."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((WIDTH,), dtype="float64")
    f = keras.layers.Dense(WIDTH, activation="tanh", dtype="float64", name="f",
                           kernel_initializer=keras.initializers.RandomNormal(0, 1.5))
    x = IntegratorStage([f] * steps, "euler", "ode", dtype="float64", name="stage")(inputs)
    outputs = keras.layers.Dense(3, activation="softmax", dtype="float64", name="head")(x)
    return keras.Model(inputs, outputs)


def _batch(seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((16, WIDTH)), np.arange(16) % 3


def test_factor_one_is_a_bitwise_identical_copy():
    model = zoo.create_model("resnet20", depth=8, input_shape=(8, 8, 3))
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype("float32")
    copy = refine(model, 1)
    assert copy is not model and copy.count_params() == model.count_params()
    for training in (False, True):
        np.testing.assert_array_equal(copy(x, training=training), model(x, training=training))
    for a, b in zip(copy.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not {id(v) for v in copy.weights} & {id(v) for v in model.weights}


def test_stage_parameters_grow_m_fold_and_the_copies_start_equal(tmp_path):
    model = zoo.create_model("resnet20", depth=14, input_shape=(8, 8, 3), width_multiplier=0.25)
    stages = {s.name: s for s in model.layers if isinstance(s, IntegratorStage)}
    for m in (2, 4):
        _check_refined_stages(model, stages, refine(model, m), m)
    path = os.path.join(tmp_path, "refined.keras")
    refined = refine(model, 2)
    refined.save(path)
    assert keras.saving.load_model(path).count_params() == refined.count_params()


def _check_refined_stages(model, stages, refined, m):
    for new in (s for s in refined.layers if isinstance(s, IntegratorStage)):
        old = stages[new.name]
        assert new.count_params() == m * old.count_params()
        assert new.num_steps == m * old.num_steps and new.h == old.h / m
        for n, f in enumerate(old.residual_functions):
            for copy in new.residual_functions[n * m:(n + 1) * m]:
                for a, b in zip(copy.get_weights(), f.get_weights(), strict=True):
                    np.testing.assert_array_equal(a, b)
    others = sum(lay.count_params() for lay in model.layers if lay.name not in stages)
    assert refined.count_params() == others + m * sum(s.count_params() for s in stages.values())


def test_tied_stage_unties_into_n_times_m_functions():
    model = _tied_model(steps=3)
    refined = refine(model, 2)
    functions = _stage(refined).residual_functions
    assert len(functions) == 6 and len({id(f) for f in functions}) == 6
    assert refined.count_params() == 6 * _stage(model).residual_functions[0].count_params() + (
        model.get_layer("head").count_params())


@pytest.mark.numerics
def test_outputs_converge_and_the_adjoint_error_falls_as_m_grows():
    """Smooth (tied) weights: refined outputs approach the flow (successive differences
    shrink ~2× per doubling, Euler's order 1) and the guard's adjoint error falls."""
    model = _tied_model()
    x, y = _batch()
    outputs, errors = {}, {}
    for m in (1, 2, 4, 8):
        refined = refine(model, m)
        outputs[m] = np.asarray(refined(x, training=False))
        errors[m] = check_gradients(refined, x, y).max_error
    report = refine_report(model, refine(model, 2), x, y, 2)
    assert report.gradient_error_before == check_gradients(model, x, y).max_error
    assert report.gradient_error_after == errors[2]
    assert report.output_change == np.max(np.abs(outputs[2] - outputs[1]))
    # the tied function (6·6 + 6) becomes 4·2 copies; the head's 6·3 + 3 are copied once
    assert "refine ×2" in report.format() and report.parameters_after == 8 * 42 + 21
    d = [np.max(np.abs(outputs[2 * m] - outputs[m])) for m in (1, 2, 4)]
    assert d[0] > d[1] > d[2] > 0 and d[1] / d[2] > 1.5, d
    assert errors[1] > errors[2] > errors[4] > errors[8], errors
    assert errors[8] < errors[1] / 4, errors


@pytest.mark.parametrize("factor", [0, -2, 1.5, "2", True, float("nan")])
def test_bad_factors_are_refused(factor):
    with pytest.raises(KodeError, match="refinement factor must be a positive integer"):
        refine(_tied_model(steps=2), factor)


def test_integrators_that_cannot_be_refined_are_refused():
    heun = zoo.create_model("heun_resnet20", depth=8, input_shape=(8, 8, 3))
    with pytest.raises(KodeError, match="'heun', which cannot be refined"):
        refine(heun, 2)
    inputs = keras.Input((WIDTH,))
    out = IntegratorStage([keras.layers.Dense(WIDTH)] * 2, "post_activation_euler")(inputs)
    with pytest.raises(KodeError, match="post_activation_euler"):
        refine(keras.Model(inputs, out), 2)
    with pytest.raises(KodeError, match="no integrator stage"):
        refine(keras.Model(inputs, keras.layers.Dense(2)(inputs)), 2)


# ---------------------------------------------------------------- refine="auto"

@pytest.fixture(scope="module")
def smooth_errors():
    """The guard's adjoint error of the two-step tied float64 stage (h = 1/2) refined ×m.
    Measured: 0.390, 0.210, 0.0976, 0.0494, 0.0250 for m = 1, 2, 4, 8, 16."""
    model, (x, y) = _tied_model(steps=2), _batch()
    errors = {m: check_gradients(refine(model, m), x, y, mode="adjoint").max_error
              for m in AUTO_FACTORS}
    return model, x, y, errors


@pytest.mark.numerics
def test_the_adjoint_error_of_a_smooth_stage_halves_with_m(smooth_errors):
    """Euler's reversal error is O(h): on weights constant in depth, doubling m halves it."""
    *_, errors = smooth_errors
    for m in AUTO_FACTORS[:-1]:
        assert 1.6 < errors[m] / errors[2 * m] < 2.5, errors


def test_auto_picks_the_smallest_m_within_the_tolerance(smooth_errors):
    """A tolerance between the errors at m = 4 and m = 8 chooses 8, measuring no further."""
    model, x, y, errors = smooth_errors
    tolerance = math.sqrt(errors[4] * errors[8])
    logged = []
    choice = choose_factor(model, x, y, tolerance, log=logged.append)
    assert choice.factor == 8 and [r.factor for r in choice.rows] == [1, 2, 4, 8]
    assert [r.passed for r in choice.rows] == [False, False, False, True]
    for row in choice.rows:
        assert row.gradient_error == pytest.approx(errors[row.factor], rel=1e-9)
        assert row.stage_steps == (2 * row.factor,)
        assert row.parameters == refine(model, row.factor).count_params()
        # S = 16 examples × 6 float64 = 768 bytes; backprop keeps N states, the adjoint one
        assert (row.memory_backprop, row.memory_adjoint) == (2 * row.factor * 768, 768)
    assert _stage(choice.model).num_steps == 16
    (table,) = logged
    assert table == ("refine auto (adjoint gradient error, gradient guard, tolerance "
                     f"{tolerance:.3g}):\n" + choice.format())
    assert "chose m = 8" in table and f"{errors[8]:.3e}" in table and "12.0 KiB" in table
    refined = refine(model, "auto", x=x, y=y, tolerance=tolerance)
    assert _stage(refined).num_steps == 16
    for a, b in zip(refined.get_weights(), choice.model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_auto_without_a_passing_m_is_a_one_line_error(smooth_errors):
    model, x, y, errors = smooth_errors
    with pytest.raises(KodeError) as info:
        refine(model, "auto", x=x, y=y, tolerance=errors[16] / 2)
    message = str(info.value)
    assert "\n" not in message
    assert message == (
        f"no refinement factor up to 16 brings the adjoint's gradient error under the "
        f"tolerance {errors[16] / 2:.3g} (smallest: {errors[16]:.3g} at m = 16); train with "
        "--gradient checkpoint")


def test_auto_needs_a_batch_and_other_words_are_refused():
    model = _tied_model(steps=2)
    with pytest.raises(KodeError, match="measures the adjoint's gradient error on a batch: "
                                        "pass x=... and y=..."):
        refine(model, "auto")
    for bad in ("autox", "Auto", 0, 1.5):
        with pytest.raises(KodeError, match="refinement factor must be a positive integer "
                                            "or 'auto'"):
            check_refine(bad)
        with pytest.raises(KodeError, match="refinement factor must be a positive integer"):
            refine(model, bad)
    assert check_refine("auto") == "auto" and check_refine(4) == 4


def test_a_frozen_stage_stays_frozen_and_auto_does_not_count_it(smooth_errors):
    """kode finetune --freeze then --refine auto: a frozen stage trains no gradient, so its
    (nan) error is not the search's; the refined copy stays frozen."""
    model, x, y, _ = smooth_errors
    frozen = refine(model, 1)
    _stage(frozen).trainable = False
    refined = refine(frozen, 2)
    assert not _stage(refined).trainable and refined.get_layer("head").trainable
    choice = choose_factor(frozen, x, y, 1e-6)  # only the head trains: nothing to measure
    assert choice.factor == 1 and choice.rows[0].gradient_error == 0.0
