"""Keras' and TensorFlow's object contracts for every kode layer (issue 14).

- ``tf.train.Checkpoint`` saves and restores every variable (residual functions held in a
  list, LM's k_n, stochastic depth's generator state), and ``.keras`` files written before
  that fix still load with the same variable paths;
- Keras' own conformance harness ``run_layer_test`` passes, mixed precision included, and a
  per-layer float16/bfloat16 policy gives outputs of that dtype.

Each layer's own cases run beside it (``kode/layers/*_test.py``, :mod:`kode.testing.layers`).
"""

import os
import tempfile
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf

import kode  # noqa: F401  (registers the layers for load_model)
from kode import testing
from kode.scopes import precision_scope

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures")


def test_keras_file_written_before_issue14_still_loads_exactly():
    # Written by main 0164cc0 (tests/fixtures/make_before_issue14.py): an LM-ResNet14 with
    # stochastic depth after one SGD step; LM k_n, transitions and stages all present.
    model = keras.saving.load_model(os.path.join(FIXTURES, "lm_resnet14_sd_before_issue14.keras"))
    saved = np.load(os.path.join(FIXTURES, "lm_resnet14_sd_before_issue14.npz"))
    assert len(model.weights) == len([k for k in saved.files if k.startswith("w")]) == 80
    for i, w in enumerate(model.weights):
        np.testing.assert_array_equal(np.asarray(w), saved[f"w{i}"], err_msg=w.path)
    assert sum("lm_k" in w.path for w in model.weights) == 3
    np.testing.assert_allclose(model.predict(saved["x"], verbose=0), saved["probs"], atol=1e-6)


def test_keras_file_with_one_scalar_per_lm_step_loads_its_k_n_and_predictions():
    # Written by 17a904c (tests/fixtures/make_before_lm_k_vector.py), when each LM step's k_n
    # was a scalar variable lm_k_<n>: an LM-ResNet20 after one SGD step, two k_n per stage.
    from kode.tools.diagnostics import lm_k_values

    path = os.path.join(FIXTURES, "lm_resnet20_before_lm_k_vector.keras")
    model = keras.saving.load_model(path)
    saved = np.load(os.path.join(FIXTURES, "lm_resnet20_before_lm_k_vector.npz"))
    ks = [v for v in model.weights if "lm_k" in v.path]
    assert [(v.path, v.shape) for v in ks] == [(f"stage{i}/lm_k", (2,)) for i in (1, 2, 3)]
    # The old scalars, in step order, are the entries of the new vectors: same labels, values.
    assert lm_k_values(model) == [(str(p), float(k)) for p, k in
                                  zip(saved["k_paths"], saved["k_values"], strict=True)]
    assert len(set(saved["k_values"].tolist())) == 6  # a mix-up of entries would show
    # Same predictions: the new (u, d) arithmetic differs from the old one by rounding only.
    np.testing.assert_allclose(model.predict(saved["x"], verbose=0), saved["probs"],
                               rtol=1e-5, atol=1e-6)


def test_keras_file_round_trips_the_k_vector_and_refuses_a_wrong_count(tmp_path):
    import h5py

    import zoo

    model = zoo.create_model("lm_resnet20", depth=20, input_shape=(8, 8, 3),
                             width_multiplier=0.25)
    for v in model.weights:
        if "lm_k" in v.path:
            v.assign(np.linspace(-0.5, 0.5, v.shape[0]))
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype("float32")
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    for a, b in zip(model.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=a.path)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    # Three scalars where the first stage holds two k_n: Keras' count error, not a silent load.
    with zipfile.ZipFile(tmp_path / "m.keras") as archive:
        archive.extract("model.weights.h5", tmp_path)
    weights = tmp_path / "model.weights.h5"
    with h5py.File(weights, "r+") as f:
        group = f["layers/integrator_stage/vars"]  # Keras names the group by class
        assert group["0"].shape == (2,)
        del group["0"]
        for i in range(3):
            group[str(i)] = np.float32(-0.01 * i)
    with pytest.raises(ValueError, match="expected 1 variables"):
        loaded.load_weights(weights)


def test_checkpoint_round_trip_detects_a_layer_list_tensorflow_does_not_see():
    # The check itself: a Keras layer keeping its sublayers in a plain list (what kode's stage
    # did before issue 14) loses them in tf.train.Checkpoint, and the check says so.
    class ListHolder(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.parts = [keras.layers.Dense(3), keras.layers.Dense(3)]

        def build(self, input_shape):
            for part in self.parts:
                part.build(input_shape)

        def call(self, x):
            return self.parts[1](self.parts[0](x))

    def built():
        layer = ListHolder()
        layer.build((None, 3))
        return layer

    with tempfile.TemporaryDirectory() as directory:
        with pytest.raises(AssertionError, match="lost 4 of 4"):
            testing.check_checkpoint_round_trip(built(), directory, fresh=built())


def test_checkpoint_restores_every_variable_into_a_fresh_zoo_model():
    # LM k_n (stages after a transition), stochastic depth's generator states, transitions.
    import zoo

    overrides = dict(depth=14, input_shape=(8, 8, 3), width_multiplier=0.25)
    model = zoo.create_model("lm_resnet56_sd", **overrides)
    variables = testing.checkpointed_variables(model)
    assert sum("lm_k" in v.path for v in variables) == 3
    assert sum("seed_generator" in v.path for v in variables) == 6
    with tempfile.TemporaryDirectory() as directory:
        testing.check_checkpoint_round_trip(
            model, directory, fresh=zoo.create_model("lm_resnet56_sd", **overrides))


@pytest.mark.parametrize("policy", ["float16", "mixed_float16"])
def test_adjoint_gradients_in_float16_match_backprop(policy):
    # Reversible Heun is exact in exact arithmetic: in float16 the adjoint's gradients must
    # agree with backprop's to float16 rounding (both computed on the same weights and batch).
    from kode import BasicBlock, IntegratorStage

    # Measured (seeds 0-3): max relative error 1.8e-3…3.2e-3 in float16 and mixed_float16,
    # 3e-7…6e-7 in float32; float16's epsilon is 9.8e-4.
    keras.utils.set_random_seed(0)
    stage = IntegratorStage([BasicBlock(4, dtype=policy) for _ in range(3)], "reversible_heun",
                            step_size="ode", gradient="adjoint", dtype=policy)
    x = np.random.default_rng(0).standard_normal((2, 4, 4, 4)).astype("float32")
    stage(x)
    grads = {}
    for mode in ("backprop", "adjoint"):
        stage.gradient = mode
        with tf.GradientTape() as tape:
            y = stage(x, training=True)
            loss = tf.reduce_sum(tf.cast(y, "float32") ** 2)
        assert y.dtype == "float16"
        grads[mode] = [np.asarray(tf.cast(g, "float32"))
                       for g in tape.gradient(loss, stage.trainable_variables)]
    for v, a, b in zip(stage.trainable_variables, grads["adjoint"], grads["backprop"],
                       strict=True):
        assert np.all(np.isfinite(a)), v.path
        error = np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12)
        assert error < 1e-2, f"{v.path}: adjoint vs backprop relative error {error:.3g}"


@pytest.mark.parametrize("gradient", ["checkpoint", "backprop"])
def test_global_mixed_float16_policy_trains_lm_with_float32_k(gradient):
    # Under the global policy LM's k_n stay float32 variables; the checkpoint mode recomputes
    # steps in the backward pass, outside the layer's autocast scope, where k_n is cast to the
    # float16 state by the integrator itself.
    import zoo

    with precision_scope("mixed_float16"):
        model = zoo.create_model("lm_resnet20", depth=14, input_shape=(8, 8, 3),
                                 width_multiplier=0.25, gradient=gradient)
    ks = [v for v in model.trainable_variables if "lm_k" in v.path]
    assert ks and all(v.dtype == "float32" for v in ks)
    x = np.random.default_rng(0).standard_normal((4, 8, 8, 3)).astype("float32")
    before = [np.asarray(v) for v in ks]
    # No loss scaling: its first steps are skipped on purpose (scale too high), and k_n must move.
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy",
                  auto_scale_loss=False)
    loss = model.train_on_batch(x, np.arange(4))
    assert np.isfinite(loss)
    assert all(not np.array_equal(b, np.asarray(v)) for b, v in zip(before, ks, strict=True))


def test_containers_keep_their_dtype_around_sublayers_of_another_policy():
    # Residual functions built with the default float32 policy inside a float16 stage,
    # transition and stochastic depth: the state and outputs stay float16.
    from kode import BasicBlock, IntegratorStage, Projection, StochasticDepth, TransitionBlock

    x = np.random.default_rng(0).standard_normal((2, 4, 4, 4)).astype("float32")
    for integrator in ("euler", "lm", "momentum"):
        stage = IntegratorStage([BasicBlock(4), BasicBlock(4)], integrator, dtype="float16")
        assert stage(x).dtype == "float16", integrator
    assert StochasticDepth(BasicBlock(4), 0.5, dtype="float16")(x).dtype == "float16"
    outputs = TransitionBlock(BasicBlock(8, 2), Projection(8, 2), dtype="bfloat16")(x)
    assert [y.dtype for y in outputs] == ["bfloat16", "bfloat16"]


def test_every_kode_layer_of_a_model_needs_a_layer_case():
    class Unregistered(keras.layers.Layer):
        def call(self, x):
            return x

    Unregistered.__module__ = "kode.somewhere"  # as if defined in the library
    inputs = keras.Input((4, 4, 4))
    model = keras.Model(inputs, Unregistered()(kode.BasicBlock(4)(inputs)), name="probe")
    with pytest.raises(AssertionError, match=r"without a layer case: \['.*Unregistered'\]"):
        testing.check_layers_have_cases(model)
    testing.check_layers_have_cases(keras.Model(inputs, kode.BasicBlock(4)(inputs)))
