"""PolyNet, FractalNet and RevNet as integrators (Lu et al.'s readings): formulas, orders on a
linear ODE, reversals, the split state of RevNet in a stage, and the adjoint on zoo models."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy.linalg import expm

from kode import BasicBlock, IntegratorStage, get_integrator
from kode.errors import KodeError
from kode.gradients import check_gradient_mode

WIDTH = 4


def _matrices(seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return [tf.constant(scale * rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH), "float64")
            for _ in range(2)]


def _x0(seed=1, width=WIDTH, dtype="float64"):
    return tf.constant(np.random.default_rng(seed).standard_normal((3, width)), dtype)


def _linear_problem(name):
    """Functions, initial state and exact x(1) of a linear ODE the scheme discretizes.

    PolyNet, FractalNet: x' = x A (row vectors), x(1) = x0 expm(A).
    RevNet: X' = Y A, Y' = X B, i.e. z' = z M with z = [X, Y], M = [[0, B], [A, 0]].
    """
    a, b = _matrices()
    if name == "revnet":
        z0 = _x0(width=2 * WIDTH)
        m = np.block([[np.zeros((WIDTH, WIDTH)), b.numpy()], [a.numpy(), np.zeros((WIDTH, WIDTH))]])
        return [lambda y: y @ a, lambda x: x @ b], z0, z0.numpy() @ expm(m)
    x0 = _x0()
    return [lambda x: x @ a] * 2, x0, x0.numpy() @ expm(a.numpy())


def _run(integrator, fns_per_step, x, n):
    """Integrate n steps of size 1/n; returns every state."""
    h = 1.0 / n
    fns = fns_per_step * n if integrator.functions_per_step == 2 else fns_per_step[:1] * n
    state = integrator.init_state(x, None, fns, h)
    states = [state]
    for k in range(integrator.num_steps(len(fns))):
        state = integrator.step(k, state, fns, h, [])
        states.append(state)
    return fns, h, states


@pytest.mark.numerics
@pytest.mark.parametrize("name, order", [("polynet", 1), ("fractalnet", 2), ("revnet", 1)])
def test_convergence_order_on_a_linear_ode_in_float64(name, order):
    integrator = get_integrator(name)
    assert integrator.order == order
    fns, x0, exact = _linear_problem(name)
    steps = [8, 16, 32, 64]
    errors = [float(np.max(np.abs(integrator.output(_run(integrator, fns, x0, n)[2][-1]) - exact)))
              for n in steps]
    slope = np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert slope == pytest.approx(-order, abs=0.15), errors


def _tanh(seed, width):
    w = tf.constant(np.random.default_rng(seed).standard_normal((width, width)) / np.sqrt(width),
                    "float32")
    return lambda x: tf.tanh(x @ w)


def test_step_formulas():
    x = _x0(dtype="float32")
    f, g = _tanh(0, WIDTH), _tanh(1, WIDTH)
    (poly,) = get_integrator("polynet").step(0, (x,), [f], 0.5, [])
    np.testing.assert_allclose(poly, x + 0.5 * f(x) + 0.5 * f(0.5 * f(x)), rtol=1e-6)
    # FractalNet: k1 u + k2 (k3 u + f1(u)) + f2(k3 u + f1(u)), k1 = k2 = 1/2, k3 = 1,
    # f1 = h g1, f2 = (h/2) g2 (the averaging join).
    (frac,) = get_integrator("fractalnet").step(0, (x,), [f, g], 0.5, [])
    v = x + 0.5 * f(x)
    np.testing.assert_allclose(frac, 0.5 * x + 0.5 * v + 0.25 * g(v), rtol=1e-6)
    rev = get_integrator("revnet")
    z = _x0(width=2 * WIDTH, dtype="float32")
    state = rev.init_state(z, None, [f, g], 0.5)
    np.testing.assert_array_equal(rev.output(state), z)
    big_x, big_y = rev.step(0, state, [f, g], 0.5, [])
    want_x = z[:, :WIDTH] + 0.5 * f(z[:, WIDTH:])
    np.testing.assert_allclose(big_x, want_x, rtol=1e-6)
    np.testing.assert_allclose(big_y, z[:, WIDTH:] + 0.5 * g(want_x), rtol=1e-6)


@pytest.mark.numerics
def test_revnet_reversal_is_exact_over_many_steps_in_float32():
    rev = get_integrator("revnet")
    fns = [_tanh(s, WIDTH) for s in range(64)]
    z = _x0(width=2 * WIDTH, dtype="float32")
    states = [rev.init_state(z, None, fns, 0.125)]
    for n in range(32):
        states.append(rev.step(n, states[-1], fns, 0.125, []))
    state = states[-1]
    for n in reversed(range(32)):
        state = rev.reverse_step(n, state, fns, 0.125, [])
        for got, want in zip(state, states[n], strict=True):
            assert float(tf.reduce_max(tf.abs(got - want))) <= 1e-5
    assert float(tf.reduce_max(tf.abs(rev.output(states[-1]) - z))) > 0.1  # the steps moved x


@pytest.mark.numerics
@pytest.mark.parametrize("name, slope", [("polynet", 2), ("fractalnet", 3)])
def test_approximate_reversal_error_falls_with_h(name, slope):
    # Rebuilding x_0 from x_N by N reverse steps on a linear ODE. PolyNet:
    # (I − F)(I + F + F²) = I − F³, local O(h³), global O(h²). FractalNet (Heun run backwards):
    # R(−hA) R(hA) = I + h⁴A⁴/4 with R(z) = 1 + z + z²/2, local O(h⁴), global O(h³).
    integrator = get_integrator(name)
    fns, x0, _ = _linear_problem(name)
    errors = []
    for n in (8, 16, 32):
        all_fns, h, states = _run(integrator, fns, x0, n)
        state = states[-1]
        for k in reversed(range(n)):
            state = integrator.reverse_step(k, state, all_fns, h, [])
        errors.append(float(tf.reduce_max(tf.abs(integrator.output(state) - x0))))
    measured = np.polyfit(np.log([8, 16, 32]), np.log(errors), 1)[0]
    assert measured == pytest.approx(-slope, abs=0.2), errors
    assert integrator.reversal == "approximate"


def test_revnet_stage_runs_its_functions_on_half_the_channels():
    keras.utils.set_random_seed(0)
    stage = IntegratorStage([BasicBlock(4, name=f"f{i}") for i in range(4)], "revnet")
    x = np.random.default_rng(0).standard_normal((2, 5, 5, 8)).astype("float32")
    y = stage(x)
    assert stage.num_steps == 2 and tuple(y.shape) == x.shape
    assert stage.residual_functions[0].bn1.gamma.shape == (4,)
    with pytest.raises(ValueError, match="keep the state's shape"):
        IntegratorStage([BasicBlock(8), BasicBlock(8)], "revnet")(x)
    with pytest.raises(ValueError, match="odd number of channels"):
        IntegratorStage([BasicBlock(2), BasicBlock(2)], "revnet")(x[..., :5])
    with pytest.raises(ValueError, match="two residual functions per step"):
        IntegratorStage([BasicBlock(4)] * 3, "revnet")


def test_gradient_modes_where_a_reversal_exists_or_not():
    for name in ("polynet", "fractalnet", "revnet"):
        assert check_gradient_mode("adjoint", get_integrator(name)) == "adjoint"
    with pytest.raises(KodeError, match="'lm' has no stable reversal"):
        check_gradient_mode("adjoint", get_integrator("lm"))


@pytest.mark.numerics
def test_revnet_stage_adjoint_equals_backprop():
    # Eager here; graph mode (model.fit's tf.function) in test_revnet_trains_with_the_exact_...
    x = tf.constant(np.random.default_rng(0).standard_normal((2, 5, 5, 8)), "float32")
    grads = {}
    for mode in ("backprop", "adjoint"):
        keras.utils.set_random_seed(0)
        stage = IntegratorStage([BasicBlock(4, name=f"f{i}") for i in range(6)], "revnet",
                                gradient=mode)

        def compute(x, stage=stage):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_sum(stage(x, training=True) ** 2)
            return tape.gradient(loss, [x, *stage.trainable_variables])

        grads[mode] = np.concatenate([np.ravel(g) for g in compute(x)])
    error = np.linalg.norm(grads["adjoint"] - grads["backprop"]) / np.linalg.norm(grads["backprop"])
    assert error <= 1e-5


SMALL = {"depth": 14, "width_multiplier": 0.25}


#: columns of the guard's table (GradientReport.format): stage, integrator, N, h, mode,
#: worst point, grad rel err, reconstr err.
GRAD_ERROR, RECONSTRUCTION = 6, 7


@pytest.mark.numerics
def test_kode_check_gradients_reports_each_scheme_and_revnet_adjoint_equals_backprop(capsys):
    """`kode check-gradients`: RevNet's adjoint = backprop (≤ 1e-4, float32) and its
    reconstruction is exact; PolyNet's and FractalNet's approximate reversals (h = 1, i.i.d.
    weights) show a visible reconstruction error and gradient errors above the tolerance, and
    are flagged (their errors in the ODE regime are bounded by
    test_polynet_and_fractalnet_adjoint_errors_fall_with_n_on_a_smooth_stage)."""
    from kode.cli import main

    def rows(out):
        return [line.split() for line in out.splitlines() if line.startswith("stage")][1:]

    options = [a for k, v in SMALL.items() for a in ("--option", f"{k}={v}")]
    assert main(["check-gradients", "revnet38", "--batch-size", "8", *options]) == 0
    out = capsys.readouterr().out
    assert rows(out) and all(r[1] == "revnet" and r[4] == "adjoint" for r in rows(out)), out
    assert all(float(r[GRAD_ERROR]) <= 1e-4 and float(r[RECONSTRUCTION]) <= 1e-5
               for r in rows(out)), out
    assert "all stages within tolerance" in out
    for name in ("polynet20", "fractalnet20"):
        code = main(["check-gradients", name, "--batch-size", "8", *options])
        out = capsys.readouterr().out
        printed = rows(out)
        assert printed and all(1e-4 < float(r[RECONSTRUCTION]) < float("inf")
                               for r in printed), out
        assert code == 1 and "inaccurate above tolerance" in out
        assert all(0.05 < float(r[GRAD_ERROR]) < float("inf") for r in printed), out


@pytest.mark.parametrize("name, at_most, slope", [("polynet", 0.1, (-1.0, -0.3)),
                                                  ("fractalnet", 5e-3, (-3.5, -2.5))])
def test_polynet_and_fractalnet_adjoint_errors_fall_with_n_on_a_smooth_stage(name, at_most,
                                                                            slope):
    """The approximate adjoints in the ODE regime (smooth weights, h = 1/N, float64): the
    guard's gradient error is bounded and falls with N = 4…32 steps. Measured: FractalNet
    3.1e-3, 3.1e-4, 3.5e-5, 4.1e-6 (slope −3.2, its reversal's local O(h⁴)); PolyNet 7.4e-2,
    4.3e-2, 3.1e-2, 2.7e-2 (slope −0.48, flattening: not analysed). An adjoint that returns
    zeros has error 1 and fails."""
    from kode.testing.models import smooth_dense_classifier
    from kode.tools.guard import check_gradients

    x = np.random.default_rng(0).standard_normal((16, 8))
    y = np.arange(16) % 3
    per_step = get_integrator(name).functions_per_step
    steps = (4, 8, 16, 32)
    errors = [check_gradients(smooth_dense_classifier(n * per_step, name), x, y).max_error
              for n in steps]
    assert max(errors) <= at_most and all(np.diff(errors) < 0), errors
    measured = np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert slope[0] <= measured <= slope[1], (measured, errors)


def test_revnet_trains_with_the_exact_adjoint_in_fit():
    import zoo

    x = np.random.default_rng(0).standard_normal((16, 8, 8, 1)).astype("float32")
    y = np.arange(16) % 10
    losses = {}
    for mode in ("adjoint", "backprop"):
        keras.utils.set_random_seed(3)
        model = zoo.create_model("revnet38", input_shape=(8, 8, 1), gradient=mode, **SMALL)
        model.compile(keras.optimizers.SGD(0.05), "sparse_categorical_crossentropy",
                      jit_compile=False)
        losses[mode] = model.fit(x, y, batch_size=8, epochs=2, shuffle=False,
                                 verbose=0).history["loss"]
    np.testing.assert_allclose(losses["adjoint"], losses["backprop"], rtol=1e-4)
    assert losses["adjoint"][1] < losses["adjoint"][0]


def test_tuner_search_space_builds_the_new_families():
    import keras_tuner as kt

    from kode.training.search_space import ZooHyperModel

    hypermodel = ZooHyperModel(["polynet", "fractalnet", "revnet"], (8, 8, 1), 10,
                               steps_per_epoch=2, epochs=1, depths=[8, 14])
    space = kt.HyperParameters()
    hypermodel.hyperparameters(space)
    names = {p.name: p for p in space.space}
    assert set(names["family"].values) == {"polynet", "fractalnet", "revnet"}
    assert "adjoint" in names["gradient_reversible"].values  # RevNet: exact reversal
    assert "adjoint" not in names["gradient"].values  # PolyNet, FractalNet: approximate
    for family, depth, want in (("revnet", 14, "revnet26"), ("fractalnet", 14, "fractalnet14"),
                                ("polynet", 8, "polynet8")):
        hp = kt.HyperParameters()
        hp.Fixed("family", family)
        hp.Fixed("depth", depth)
        hp.Fixed("width_multiplier", 0.25)
        model = hypermodel.build(hp)
        stages = [la for la in model._flatten_layers() if hasattr(la, "dynamics")]
        assert model.name == want and {s.integrator.name for s in stages} == {family}


def test_revnet_parameter_counts_near_the_published_ones():
    """Gomez et al. 2017 (CIFAR-10 table): RevNet-38 0.46M, -110 1.73M, -164 1.75M. The
    authors' layouts give 464,858 / 1,729,162 trainable (within 1%) and 1,664,778 for the
    bottleneck RevNet-164 (4.9% fewer: a difference in the bottleneck unit we did not trace)."""
    import zoo

    published = {"revnet38": (0.46e6, 0.02), "revnet110": (1.73e6, 0.02),
                 "revnet164": (1.75e6, 0.06)}
    for name, (count, rel) in published.items():
        model = zoo.create_model(name)
        ours = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
        assert ours == pytest.approx(count, rel=rel), (name, ours)
    poly, plain = zoo.create_model("polynet20"), zoo.create_model("resnet20")
    assert poly.count_params() == plain.count_params()
    with pytest.raises(KodeError, match="12n\\+2"):
        zoo.create_model("revnet38", depth=20)
