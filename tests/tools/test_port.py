"""Porting keras.applications ResNets (and kode models) into kode stages: same function."""

import os
import re
from functools import partial

import h5py
import keras
import numpy as np
import pytest
from keras.src.legacy.saving import legacy_h5_format

import zoo
from kode.compat import functional_nodes, producer_name
from kode.errors import KodeError
from kode.layers.chain import LayerChain
from kode.layers.stage import IntegratorStage
from kode.testing.applications import tiny_keras_resnet
from kode.tools.port import port_model, port_summary

# The smallest input keras.applications accepts: the ported graph is the same at 224×224.
SIZE = (32, 32, 3)
ARCHITECTURES = {
    # name: (builder, integrator, identity blocks per stage (conv2…conv5), port a copy)
    # One full-size network: the port at keras.applications' own width and depth.
    "ResNet50V2": (keras.applications.ResNet50V2, "euler", (1, 2, 4, 2), True),
    # The others are keras.applications ResNets built by its own code, narrow
    # (kode.testing.applications): ResNet50's blocks, and deeper variants which, like
    # ResNet101/152 (V1 and V2), differ from the 50s only in their blocks per stage.
    "tiny_ResNet50": (partial(tiny_keras_resnet, "v1", blocks=(3, 4, 6, 3)),
                      "post_activation_euler", (2, 3, 5, 2), True),
    "tiny_deeper_V2": (partial(tiny_keras_resnet, "v2", blocks=(3, 5, 8, 4)), "euler",
                       (1, 3, 6, 3), False),
    "tiny_deeper_V1": (partial(tiny_keras_resnet, "v1", blocks=(3, 5, 9, 3)),
                       "post_activation_euler", (2, 4, 8, 2), False),
}


def _scramble(model: keras.Model, seed: int) -> None:
    rng = np.random.default_rng(seed)
    model.set_weights([rng.standard_normal(w.shape).astype(w.dtype) for w in
                       model.get_weights()])


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_ported_keras_resnet_computes_the_same_function(arch, tmp_path):
    """Random weights (weights=None), saved to an ImageNet-format .h5 file (the file
    keras.applications downloads for weights='imagenet') and loaded back by the same
    ``model.load_weights`` call keras.applications makes; then ported: ≤ 1e-5 in inference
    and training mode."""
    builder, integrator, identity_blocks, copy = ARCHITECTURES[arch]
    original = builder(weights=None, input_shape=SIZE, classes=10)
    x = np.random.default_rng(0).uniform(-1, 1, (2, *SIZE)).astype("float32")
    # Training mode first: it updates the BN moving statistics that inference then uses.
    want = {mode: np.array(original(x, training=mode)) for mode in (True, False)}
    path = os.path.join(tmp_path, "weights.h5")
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, original)
    _scramble(original, seed=1)
    original.load_weights(path)

    # The deeper variants reuse the source's layers (copy=False, what kode.finetune does).
    ported = port_model(original, copy=copy)
    stages = [lay for lay in ported.layers if isinstance(lay, IntegratorStage)]
    assert [s.num_steps for s in stages] == list(identity_blocks)
    assert {s.integrator.name for s in stages} == {integrator}
    assert all(isinstance(f, LayerChain) for s in stages for f in s.residual_functions)
    assert ported.count_params() == original.count_params()
    assert port_summary(ported).stages[2] == ("conv4_stage", integrator, identity_blocks[2])
    for mode in (False, True):
        got = np.array(ported(x, training=mode))
        assert np.max(np.abs(got - want[mode])) <= 1e-5, (arch, mode)
    shared = {id(v) for v in ported.weights} & {id(v) for v in original.weights}
    assert len(shared) == (0 if copy else len(original.weights))
    if copy:  # the port owns copies: changing it leaves the source as it was
        stages[0].residual_functions[0].chain[0].weights[0].assign(
            np.zeros(stages[0].residual_functions[0].chain[0].weights[0].shape))
        np.testing.assert_array_equal(np.array(original(x, training=False)), want[False])
    if integrator == "post_activation_euler":
        with pytest.raises(KodeError, match="relu.*not invertible.*checkpoint"):
            stages[0].gradient = "adjoint"
        stages[0].gradient = "checkpoint"


def _graph(model: keras.Model) -> list[tuple]:
    """Each layer's class, name, shape-relevant settings and input layers, in graph order
    (Keras' numbered default names, such as max_pooling2d_3, without their number)."""
    def plain(name: str) -> str:
        return re.sub(r"_\d+$", "", name)

    keys = ("strides", "kernel_size", "padding", "pool_size", "use_bias", "epsilon",
            "activation", "axis")
    return [(type(op).__name__, plain(op.name),
             {k: v for k, v in op.get_config().items() if k in keys},
             [plain(producer_name(t)) for t in node.input_tensors])
            for op, node in functional_nodes(model)]


@pytest.mark.parametrize("version, full", [("v2", keras.applications.ResNet50V2),
                                           ("v1", keras.applications.ResNet50)])
def test_tiny_keras_resnets_are_keras_applications_graphs(version, full):
    """A tiny ResNet with the 50's blocks is ResNet50V2's / ResNet50's graph, layer by layer
    (names, kinds, strides, connections), but for the widths: what the port tests above
    rely on."""
    tiny = tiny_keras_resnet(version, blocks=(3, 4, 6, 3), input_shape=SIZE, classes=10)
    assert _graph(tiny) == _graph(full(weights=None, input_shape=SIZE, classes=10))
    assert tiny.count_params() < 50_000


def test_ported_model_saves_trains_with_the_adjoint_and_reloads(tmp_path):
    """A small pre-activation network written with keras layers: x + f(x) blocks become an
    Euler stage; the port round-trips through .keras and trains with gradient='adjoint'."""
    inputs = keras.Input((8, 8, 4))
    x = inputs
    for i in range(3):
        y = keras.layers.BatchNormalization(name=f"b{i}_bn")(x)
        y = keras.layers.Activation("relu", name=f"b{i}_relu")(y)
        y = keras.layers.Conv2D(4, 3, padding="same", name=f"b{i}_conv")(y)
        x = keras.layers.Add(name=f"b{i}_add")([x, y])
    out = keras.layers.Dense(3, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x))
    source = keras.Model(inputs, out)
    ported = port_model(source, gradient="adjoint")
    (stage,) = [lay for lay in ported.layers if isinstance(lay, IntegratorStage)]
    assert stage.num_steps == 3 and stage.gradient == "adjoint"
    batch = np.random.default_rng(0).standard_normal((4, 8, 8, 4)).astype("float32")
    np.testing.assert_allclose(ported(batch), source(batch), atol=1e-6)
    path = os.path.join(tmp_path, "ported.keras")
    ported.save(path)
    restored = keras.saving.load_model(path)
    np.testing.assert_allclose(restored(batch), source(batch), atol=1e-6)
    restored.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    before = [np.array(w) for w in restored.trainable_weights]
    assert np.isfinite(restored.train_on_batch(batch, np.arange(4) % 3))
    assert sum(not np.array_equal(b, np.array(w)) for b, w in
               zip(before, restored.trainable_weights, strict=True)) == len(before)


def test_kode_models_port_to_a_copy(tmp_path):
    """A zoo model (and the same model read from .keras): stages already, nothing to replace;
    the port is an independent copy computing the same function."""
    model = zoo.create_model("resnet8" if "resnet8" in zoo.list_models() else "resnet20",
                             depth=8, input_shape=(8, 8, 3))
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    batch = np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype("float32")
    for source in (model, keras.saving.load_model(path)):
        ported = port_model(source)
        assert port_summary(ported).stages == ()
        assert "kode stages already" in port_summary(ported).format()
        np.testing.assert_array_equal(ported(batch, training=False),
                                      model(batch, training=False))
        assert not {id(v) for v in ported.weights} & {id(v) for v in source.weights}


def test_port_refuses_what_it_cannot_read():
    with pytest.raises(KodeError, match="Sequential model .* has no graph yet"):
        port_model(keras.Sequential([keras.layers.Dense(2)]))


def test_post_activation_euler_step_checkpoint_and_refused_adjoint():
    """x_{n+1} = relu(x_n + h f_n(x_n)); checkpoint gives backprop's gradients; the adjoint is
    refused, saying why."""
    import tensorflow as tf

    fns = [keras.layers.Dense(4, name=f"f{i}") for i in range(3)]
    stage = IntegratorStage(fns, "post_activation_euler", step_size=0.5)
    x = np.random.default_rng(0).standard_normal((5, 4)).astype("float32")
    want = x
    stage(x)
    for f in fns:
        want = np.maximum(want + 0.5 * np.asarray(f(want)), 0.0)
    np.testing.assert_allclose(stage(x), want, rtol=1e-6, atol=1e-6)
    grads = {}
    for mode in ("backprop", "checkpoint"):
        stage.gradient = mode
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.sin(stage(x, training=True)))
        grads[mode] = tape.gradient(loss, stage.trainable_variables)
    for a, b in zip(grads["backprop"], grads["checkpoint"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(KodeError,
                       match="'post_activation_euler' cannot be reversed: relu.*not invertible"):
        stage.gradient = "adjoint"


def test_layer_chain_variables_are_in_tf_checkpoints(tmp_path):
    """tf.train.Checkpoint (the training checkpoints resume from) sees a ported stage's
    list-held layers."""
    import tensorflow as tf

    chain = LayerChain([keras.layers.Dense(3, name="a"), keras.layers.Dense(3, name="b")])
    chain.build((None, 3))
    saved = [np.array(v) for v in chain.weights]
    path = tf.train.Checkpoint(layer=chain).write(os.path.join(tmp_path, "ckpt"))
    for v in chain.weights:
        v.assign(np.zeros(v.shape))
    tf.train.Checkpoint(layer=chain).read(path).assert_consumed()
    for a, b in zip(saved, chain.weights, strict=True):
        np.testing.assert_array_equal(a, b)
