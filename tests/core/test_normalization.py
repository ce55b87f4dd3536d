"""kode.normalization.BatchNormalization (TensorFlow's fused kernel) against Keras' layer."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import zoo
from kode.layers.normalization import BatchNormalization

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures")


def _inputs(shape=(8, 5, 6, 4), axis=-1, seed=0):
    """Channels of very different scales: one with variance 1e-6 < epsilon = 1e-5 (where a
    clamped epsilon, e.g. cuDNN's 1.001e-5, would show) and one with a small offset mean."""
    x = np.random.default_rng(seed).standard_normal(shape).astype("float32")
    x[..., 1] *= 1e-3
    x[..., 2] = x[..., 2] * 3e-3 + 0.01
    x[..., 3] = x[..., 3] * 5.0 - 2.0
    return np.ascontiguousarray(np.moveaxis(x, -1, axis))


def _pair(axis, **kwargs):
    """A Keras layer and a fused one with the same (non-trivial) weights."""
    rng = np.random.default_rng(1)
    layers = (keras.layers.BatchNormalization(axis=axis, momentum=0.9, epsilon=1e-5, **kwargs),
              BatchNormalization(axis=axis, momentum=0.9, epsilon=1e-5, **kwargs))
    weights = None
    for layer in layers:
        layer.build((8, 5, 6, 4) if axis in (-1, 3) else (8, 4, 5, 6))
        weights = weights or [rng.uniform(0.5, 1.5, w.shape).astype("float32")
                              for w in layer.get_weights()]
        layer.set_weights(weights)
    return layers


def _run(layer, x, training, cotangent):
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=training)
        loss = tf.reduce_sum(tf.cast(y, "float32") * cotangent)
    grads = tape.gradient(loss, [x, *layer.trainable_weights])
    return [y, *grads, *layer.non_trainable_weights]


def _assert_close(got, want, rtol=1e-5):
    """Equal within rtol of the array's largest magnitude (float32 rounding, other order)."""
    for g, w in zip(got, want, strict=True):
        g, w = np.asarray(g, "float64"), np.asarray(w, "float64")
        assert g.shape == w.shape
        assert np.max(np.abs(g - w)) <= rtol * max(np.max(np.abs(w)), 1e-30)


@pytest.mark.parametrize("axis", [-1, 1])
@pytest.mark.parametrize("training, trainable", [(True, True), (False, True), (True, False)])
def test_outputs_gradients_and_moving_statistics_equal_keras(axis, training, trainable):
    x = _inputs(axis=axis)
    cotangent = np.random.default_rng(2).standard_normal(x.shape).astype("float32")
    keras_bn, fused = _pair(axis)
    keras_bn.trainable = fused.trainable = trainable  # trainable=False: inference mode
    before = fused.moving_variance.numpy().copy()
    for _ in range(3):  # moving statistics after several updates
        want, got = _run(keras_bn, x, training, cotangent), _run(fused, x, training, cotangent)
        _assert_close(got, want)
    moved = not np.array_equal(fused.moving_variance.numpy(), before)
    assert moved == (training and trainable)


def test_moving_variance_is_the_biased_batch_variance():
    x = _inputs()
    layer = BatchNormalization(momentum=0.0, epsilon=1e-5)
    layer(x, training=True)
    np.testing.assert_allclose(layer.moving_mean.numpy(), x.mean(axis=(0, 1, 2)), rtol=1e-5,
                               atol=1e-7)
    # The kernel returns n/(n−1)·σ² (n = 240 here, a 0.4% difference): Keras keeps σ².
    np.testing.assert_allclose(layer.moving_variance.numpy(), x.var(axis=(0, 1, 2)), rtol=1e-5)


def _op_types(layer, x, training):
    fn = tf.function(lambda t: layer(t, training=training))
    return {op.type for op in fn.get_concrete_function(tf.constant(x)).graph.get_operations()}


def test_fused_kernel_where_it_applies_keras_path_elsewhere():
    x4 = _inputs()
    assert "FusedBatchNormV3" in _op_types(BatchNormalization(), x4, True)
    assert "FusedBatchNormV3" in _op_types(BatchNormalization(), x4, False)
    x2 = x4.reshape(-1, 4)
    assert "FusedBatchNormV3" not in _op_types(BatchNormalization(), x2, True)
    assert "FusedBatchNormV3" not in _op_types(BatchNormalization(axis=2), x4, True)
    assert "FusedBatchNormV3" not in _op_types(BatchNormalization(dtype="float64"),
                                               x4.astype("float64"), True)
    # The fall-backs are Keras' layer itself.
    keras_bn, fused = keras.layers.BatchNormalization(), BatchNormalization()
    np.testing.assert_array_equal(fused(x2, training=True), keras_bn(x2, training=True))


def test_config_is_keras_config_and_round_trips():
    fused = BatchNormalization(momentum=0.8, epsilon=1e-4, center=False,
                               gamma_initializer="zeros", name="bn")
    config = fused.get_config()
    assert config == keras.layers.BatchNormalization.from_config(config).get_config()
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(fused))
    assert type(again) is BatchNormalization and again.get_config() == config
    # center=False / scale=False reach the kernel as β = 0 / γ = 1.
    x = _inputs()
    for kwargs in ({"center": False}, {"scale": False}):
        keras_bn, ours = _pair(-1, **kwargs)
        _assert_close([ours(x, training=True)], [keras_bn(x, training=True)])


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_keeps_float32_statistics(policy):
    x = _inputs()
    keras_bn, fused = (cls(momentum=0.9, epsilon=1e-5, dtype=policy)
                       for cls in (keras.layers.BatchNormalization, BatchNormalization))
    want, got = keras_bn(x, training=True), fused(x, training=True)
    assert got.dtype == want.dtype and fused.moving_variance.dtype == "float32"
    tol = 1e-2 if policy == "mixed_bfloat16" else 2e-3
    np.testing.assert_allclose(np.asarray(got, "float32"), np.asarray(want, "float32"),
                               atol=tol * 4, rtol=tol)
    _assert_close(fused.non_trainable_weights, keras_bn.non_trainable_weights, rtol=1e-5)


@pytest.mark.parametrize("name", ["lm_resnet20", "lm_resnext50_32x4d"])
def test_keras_files_saved_before_the_fused_layer_load_with_the_same_predictions(name):
    # Saved by kode blocks on keras.layers.BatchNormalization (fixtures/make_pre_fused_bn.py).
    model = keras.saving.load_model(os.path.join(FIXTURES, f"pre_fused_bn_{name}.keras"))
    saved = np.load(os.path.join(FIXTURES, f"pre_fused_bn_{name}.npz"))
    np.testing.assert_allclose(model.predict(saved["x"], verbose=0), saved["predictions"],
                               rtol=1e-5, atol=1e-6)
    kinds = {type(la) for la in model._flatten_layers()
             if isinstance(la, keras.layers.BatchNormalization)}
    assert BatchNormalization in kinds


def test_every_zoo_block_uses_the_fused_layer():
    model = zoo.create_model("lm_resnext50_32x4d", depth=18, bottleneck=True,
                             input_shape=(32, 32, 3), classes=10, width_multiplier=1 / 16)
    norms = [la for la in model._flatten_layers()
             if isinstance(la, keras.layers.BatchNormalization)]
    assert norms and all(type(la) is BatchNormalization for la in norms)


def test_pre_fused_fixture_generator_refuses_the_fused_code(tmp_path):
    # make_pre_fused_bn.py runs with the code of 0277e14; today's blocks would write fused files.
    import runpy

    generator = runpy.run_path(os.path.join(FIXTURES, "make_pre_fused_bn.py"))
    with pytest.raises(SystemExit, match="run it with the code of commit 0277e14"):
        generator["main"](str(tmp_path))
    assert list(tmp_path.iterdir()) == []
