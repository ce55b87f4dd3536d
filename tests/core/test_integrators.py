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
    euler.set_weights([w.numpy() for w in lm.weights if "lm_k" not in w.path])
    (k,) = lm.integrator_variables
    k.assign(np.zeros(3))
    np.testing.assert_allclose(lm([x, history]), euler(x), atol=1e-5)
    # With k ≠ 0 the history matters.
    k.assign([-0.5, 0.0, 0.0])
    assert not np.allclose(lm([x, history]), euler(x), atol=1e-3)


def test_lm_k_is_one_vector_per_stage_in_the_init_range():
    first = _stage("lm", num=3)
    first(np.zeros((1, 4, 4, 4), "float32"))
    after_transition = _stage("lm", num=3)
    after_transition([np.zeros((1, 4, 4, 4), "float32")] * 2)
    (k_first,) = first.integrator_variables
    (k_after,) = after_transition.integrator_variables
    assert k_first.shape == (2,)  # step 0 of the network is plain Euler
    assert k_after.shape == (3,)
    assert k_first.path.endswith("/lm_k") and k_first.dtype == "float32"
    assert sum(v is k_first for v in first.trainable_variables) == 1
    values = np.concatenate([k_first.numpy(), k_after.numpy()])
    assert np.all((-0.1 <= values) & (values <= 0.0))
    assert len(set(k_after.numpy().tolist())) == 3  # one draw per step, not one repeated
    # A one-step stage without history is one Euler step: no k at all.
    single = _stage("lm", num=1)
    single(np.zeros((1, 4, 4, 4), "float32"))
    assert single.integrator_variables == [] and single.trainable_variables


def test_lm_k_init_range_reaches_every_entry():
    keras.utils.set_random_seed(0)
    stage = IntegratorStage([BasicBlock(4) for _ in range(40)],
                            LinearMultistep(k_init_range=(0.2, 0.3)))
    stage([np.zeros((1, 4, 4, 4), "float32")] * 2)
    values = stage.integrator_variables[0].numpy()
    assert values.shape == (40,) and np.all((0.2 <= values) & (values <= 0.3))
    assert values.std() > 0.01  # spread over the range (U(0.2, 0.3): std 0.029)


def test_lm_step_formula():
    fns = _smooth_tanh_functions(2, dtype="float32")
    u, u_prev = _x0(), _x0(seed=5)
    ks = tf.Variable([-0.3, 0.2])  # entry i is step 2 − 2 + i: k_0 = −0.3, k_1 = 0.2
    lm = LinearMultistep()
    state = lm.init_state(u, u_prev, fns, 0.5)
    np.testing.assert_allclose(state[1], u - u_prev)  # d_0 = u_0 − u_{−1}
    new, d = lm.step(0, state, fns, 0.5, [ks])
    # atol: the step rounds as u + (h f − k d), so entries near 0 differ by ~1 ulp of u.
    want = 1.3 * u - 0.3 * u_prev + 0.5 * fns[0](u)
    np.testing.assert_allclose(new, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d, new - u, rtol=1e-5, atol=1e-6)
    newer, _ = lm.step(1, (new, d), fns, 0.5, [ks])  # step 1 reads k_1
    np.testing.assert_allclose(newer, 0.8 * new + 0.2 * u + 0.5 * fns[1](new), rtol=1e-5,
                               atol=1e-6)
    # Without a history step 0 is Euler and hands over d_1 = h f_0(u_0).
    new, d = lm.step(0, lm.init_state(u, None, fns, 0.5), fns, 0.5, [ks[1:]])
    np.testing.assert_allclose(new, u + 0.5 * fns[0](u), rtol=1e-6)
    np.testing.assert_allclose(d, 0.5 * fns[0](u), rtol=1e-6)


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


class _PaperLM(LinearMultistep):
    """Lu et al.'s form on the state (u_n, u_{n−1}): u_{n+1} = (1 − k_n) u_n + k_n u_{n−1}
    + h f_n(u_n), same variables as LinearMultistep."""

    def init_state(self, x, history, fns, h):
        return (x, history)

    def step(self, n, state, fns, h, params):
        u, prev = state
        if prev is None:
            return (u + h * fns[n](u), u)
        (ks,) = params
        k = ks[n - (len(fns) - ks.shape[0])]
        return ((1.0 - k) * u + k * prev + h * fns[n](u), u)


@pytest.mark.numerics
@pytest.mark.parametrize("history", [True, False])
@pytest.mark.parametrize("policy", [
    "float32", pytest.param("mixed_bfloat16", marks=pytest.mark.bfloat16)])
def test_lm_stage_equals_the_paper_form_with_its_gradients(policy, history):
    # The stage runs on (u_n, d_n = u_n − u_{n−1}): the same map as the paper's, forward and
    # gradients (w.r.t. x, the history, every k_n and every weight), up to rounding. Under
    # mixed_bfloat16 both run f_n in bfloat16 on the float32 stream; a float32 rounding
    # difference of the stream rarely flips f_n's bfloat16 input, and a flip changes a
    # gradient by ~2^-8 relative (measured, seeds 0-2: outputs equal, gradients within 1e-6
    # but for one seed's 3.5e-3; with one intra-op thread, as the test workers run, this
    # seed's 1.1e-2; the float32 error is 1e-6). A wiring error moves them by O(1).
    rng = np.random.default_rng(3)
    x, prev, g = (tf.constant(rng.standard_normal((4, 6, 6, 8)), tf.float32) for _ in range(3))
    k_values = rng.uniform(-0.6, 0.6, 6)  # away from 0: the history term matters
    inputs = [x, prev] if history else x
    results = []
    for integrator in (LinearMultistep(), _PaperLM()):
        keras.utils.set_random_seed(3)
        stage = IntegratorStage([BasicBlock(8, dtype=policy) for _ in range(6)], integrator,
                                step_size=0.5, dtype=policy)
        stage(inputs)
        (ks,) = stage.integrator_variables
        ks.assign(k_values[:ks.shape[0]])
        with tf.GradientTape() as tape:
            tape.watch([x, prev])
            out = tf.cast(stage(inputs, training=True), tf.float32)
        sources = [x, prev] if history else [x]
        sources += stage.trainable_variables
        results.append([out, *tape.gradient(out, sources, output_gradients=g)])
    tol = 2e-5 if policy == "float32" else 2**-5
    for a, b in zip(*results, strict=True):
        a, b = np.asarray(a, "float32"), np.asarray(b, "float32")
        scale_ = float(np.max(np.abs(b)))
        assert scale_ > 0
        np.testing.assert_allclose(a, b, rtol=0, atol=tol * scale_)
