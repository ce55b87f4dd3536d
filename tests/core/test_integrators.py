"""Integrator and stage layer unit tests: formulas, reversals, orders, stochastic depth."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kode import (
    INTEGRATORS,
    BasicBlock,
    IntegratorStage,
    LinearMultistep,
    StochasticDepth,
    get_integrator,
)
from kode.layers.stage import resolve_step_size


def _smooth_tanh_functions(num, width=6, dtype="float64", seed=0):
    """f_n(x) = tanh(x W(t_n)) with W smooth in t (a neural ODE's time-varying weights)."""
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((2, width, width)) / np.sqrt(width)
    ws = [tf.constant(a + np.sin(2.0 * n / max(num - 1, 1)) * b, dtype) for n in range(num)]
    return [lambda x, w=w: tf.tanh(x @ w) for w in ws]


def _x0(dtype="float32", width=6, seed=1):
    return tf.constant(np.random.default_rng(seed).standard_normal((5, width)), dtype)


def _integrate(integrator, fns, x, h, params=()):
    state = integrator.init_state(x, None, fns, h)
    states = [state]
    for n in range(integrator.num_steps(len(fns))):
        state = integrator.step(n, state, fns, h, list(params))
        states.append(state)
    return states


def test_euler_step_is_x_plus_h_f():
    fns = _smooth_tanh_functions(3, dtype="float32")
    x = _x0()
    (y,) = get_integrator("euler").step(1, (x,), fns, 0.3, [])
    np.testing.assert_allclose(y, x + 0.3 * fns[1](x), rtol=1e-6)


def test_heun_step_formula():
    fns = _smooth_tanh_functions(3, dtype="float32")
    x = _x0()
    (y,) = get_integrator("heun").step(0, (x,), fns, 0.5, [])
    k1 = 0.5 * fns[0](x)
    k2 = 0.5 * fns[1](x + k1)
    np.testing.assert_allclose(y, x + (k1 + k2) / 2, rtol=1e-6)


@pytest.mark.numerics
@pytest.mark.parametrize("name, gamma", [("reversible_heun", None), ("momentum", 0.9)])
def test_exact_reversals_undo_sixteen_steps_in_float32(name, gamma):
    integrator = get_integrator(name, **({"gamma": gamma} if gamma else {}))
    num_functions = 17 if integrator.num_steps(17) == 16 else 16
    fns = _smooth_tanh_functions(num_functions, dtype="float32")
    x = _x0()
    states = _integrate(integrator, fns, x, 1.0 / 16)
    assert len(states) == 17
    state = states[-1]
    for n in reversed(range(len(states) - 1)):
        state = integrator.reverse_step(n, state, fns, 1.0 / 16, [])
        for got, want in zip(state, states[n], strict=True):
            assert float(tf.reduce_max(tf.abs(got - want))) <= 1e-5
    np.testing.assert_allclose(integrator.output(state), x, atol=1e-5)


@pytest.mark.numerics
def test_momentum_reversal_error_grows_like_one_over_gamma():
    # Documented limit: each reverse step divides by γ, so float32 rounding grows ~γ^-n.
    integrator = get_integrator("momentum", gamma=0.5)
    fns = _smooth_tanh_functions(64, dtype="float32")
    states = _integrate(integrator, fns, _x0(), 1.0)
    state = states[-1]
    for n in reversed(range(64)):
        state = integrator.reverse_step(n, state, fns, 1.0, [])
    assert float(tf.reduce_max(tf.abs(state[0] - states[0][0]))) > 1e-3


@pytest.mark.numerics
@pytest.mark.parametrize("name, order", [("euler", 1), ("heun", 2), ("reversible_heun", 2)])
def test_convergence_order_in_float64(name, order):
    integrator = get_integrator(name)
    x = _x0("float64")
    fine = 2048
    reference = _integrate(get_integrator("heun"), _smooth_tanh_functions(fine + 1), x,
                           1.0 / fine)[-1][0]
    errors = []
    steps = [8, 16, 32, 64]
    for n in steps:
        num_functions = n + 1 if name != "euler" else n
        fns = _smooth_tanh_functions(num_functions)
        # Euler's f_n sits at t_n = n/N; re-sample the same smooth W(t) on its grid.
        if name == "euler":
            fns = _smooth_tanh_functions(n + 1)[:n]
        out = integrator.output(_integrate(integrator, fns, x, 1.0 / n)[-1])
        errors.append(float(tf.reduce_max(tf.abs(out - reference))))
    slope = np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert slope == pytest.approx(-order, abs=0.25), errors


def _stage(integrator, num=3, seed=0, **kwargs):
    keras.utils.set_random_seed(seed)
    fns = [BasicBlock(4, name=f"f{i}") for i in range(num)]
    return IntegratorStage(fns, integrator, **kwargs)


def test_lm_with_k_zero_equals_euler():
    x = np.random.default_rng(0).standard_normal((2, 6, 6, 4)).astype("float32")
    history = np.random.default_rng(1).standard_normal((2, 6, 6, 4)).astype("float32")
    lm, euler = _stage("lm"), _stage("euler")
    lm([x, history])
    euler(x)
    euler.set_weights([w for w in lm.get_weights() if np.ndim(w) > 0])  # drop the k scalars
    for v in lm.integrator_variables:
        v.assign(0.0)
    np.testing.assert_allclose(lm([x, history]), euler(x), atol=1e-5)
    # With k ≠ 0 the history matters.
    lm.integrator_variables[0].assign(-0.5)
    assert not np.allclose(lm([x, history]), euler(x), atol=1e-3)


def test_lm_k_count_and_init_range():
    first = _stage("lm", num=3)
    first(np.zeros((1, 4, 4, 4), "float32"))
    after_transition = _stage("lm", num=3)
    after_transition([np.zeros((1, 4, 4, 4), "float32")] * 2)
    assert len(first.integrator_variables) == 2  # step 0 of the network is plain Euler
    assert len(after_transition.integrator_variables) == 3
    values = [float(v) for v in first.integrator_variables + after_transition.integrator_variables]
    assert all(-0.1 <= v <= 0.0 for v in values)
    assert all("lm_k" in v.path for v in first.integrator_variables)


def test_lm_step_formula():
    fns = _smooth_tanh_functions(2, dtype="float32")
    u, u_prev = _x0(), _x0(seed=5)
    k = tf.Variable(-0.3)
    new, prev = LinearMultistep().step(0, (u, u_prev), fns, 0.5, [k])
    # atol: the step rounds as u + k(u_prev − u), so entries near 0 differ by ~1 ulp of u.
    np.testing.assert_allclose(new, 1.3 * u - 0.3 * u_prev + 0.5 * fns[0](u), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(prev, u)


def test_ode_step_size_is_horizon_over_steps():
    assert resolve_step_size("ode", 8) == pytest.approx(1 / 8)
    assert resolve_step_size("ode", 4, horizon=2.0) == pytest.approx(0.5)
    assert _stage("heun", num=5, step_size="ode").h == pytest.approx(1 / 4)
    with pytest.raises(ValueError, match="step_size"):
        resolve_step_size(0.0, 3)


def test_stochastic_depth_draw_and_expectation():
    keras.utils.set_random_seed(0)
    inner = keras.layers.Lambda(lambda x: 2.0 * x)
    sd = StochasticDepth(inner, 0.7, seed=3)
    x = np.ones((4, 3), "float32")
    np.testing.assert_allclose(sd(x, training=False), 0.7 * 2.0 * x)
    kept = []
    for _ in range(400):
        y = np.asarray(sd(x, training=True))
        assert np.all(y == y.flat[0]), "one draw per batch, not per sample"
        kept.append(y.flat[0] / 2.0)
    assert set(np.unique(kept)) <= {0.0, 1.0}
    assert np.mean(kept) == pytest.approx(0.7, abs=0.07)


def test_stage_rejects_shape_changing_residual_function():
    stage = IntegratorStage([BasicBlock(8)], "euler")
    with pytest.raises(ValueError, match="keep the state's shape"):
        stage(np.zeros((1, 4, 4, 4), "float32"))


def test_every_integrator_declares_its_properties():
    for name, cls in INTEGRATORS.items():
        integrator = cls()
        assert integrator.name == name
        assert integrator.reversal in ("exact", "approximate", "none")
        assert get_integrator({"name": name, "config": integrator.get_config()}) == integrator
    assert not get_integrator("lm").reversible
    with pytest.raises(ValueError, match="unknown integrator"):
        get_integrator("rk4")


@pytest.mark.numerics
def test_lm_step_equals_the_paper_form_with_its_gradients():
    # The step is computed as u + k(u_prev − u) + h f(u) (one reduction for ∂L/∂k): the same
    # map as Lu et al.'s (1 − k) u + k u_prev + h f(u), up to float32 rounding.
    rng = np.random.default_rng(3)
    u, u_prev, g = (tf.constant(rng.standard_normal((4, 6, 6, 8)), tf.float32) for _ in range(3))
    k = tf.Variable(-0.07)

    def f(x):
        return tf.tanh(1.3 * x)

    def run(step):
        with tf.GradientTape() as tape:
            tape.watch([u, u_prev])
            out = step()
        return [out, *tape.gradient(out, [u, u_prev, k], output_gradients=g)]

    got = run(lambda: LinearMultistep().step(1, (u, u_prev), [f, f], 0.5, [k])[0])
    want = run(lambda: (1.0 - k) * u + k * u_prev + 0.5 * f(u))
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(b))))
