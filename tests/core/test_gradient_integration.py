"""Gradient modes everywhere a Keras user trains: fit, saving, export, mixed precision,
MirroredStrategy (in a subprocess: logical devices must be set before TensorFlow starts)."""

import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import zoo
from kode.testing.models import run_standard_model_checks


@pytest.mark.parametrize("name, mode", [("revheun_resnet20", "adjoint"),
                                        ("momentum_resnet20", "adjoint"),
                                        ("lm_resnet20", "checkpoint")])
def test_standard_checks_with_memory_saving_gradients(name, mode):
    model = run_standard_model_checks(name, gradient=mode)
    modes = {layer.gradient for layer in model._flatten_layers() if hasattr(layer, "dynamics")}
    assert modes == {mode}


def test_mixed_bfloat16_adjoint_trains():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = zoo.create_model("revheun_resnet20", depth=8, input_shape=(8, 8, 1),
                                 gradient="adjoint")
        model.compile("sgd", "sparse_categorical_crossentropy", jit_compile=False)
        x = np.random.default_rng(0).standard_normal((16, 8, 8, 1)).astype("float32")
        losses = [model.train_on_batch(x, np.arange(16) % 10) for _ in range(3)]
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


MIRRORED = textwrap.dedent("""
    import json, sys
    import numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, zoo
    x = np.random.default_rng(0).standard_normal((16, 8, 8, 1)).astype("float32")
    y = np.arange(16) % 10
    def run(strategy, mode):
        with strategy.scope():
            keras.utils.set_random_seed(1)
            model = zoo.create_model("revheun_resnet20", depth=8, input_shape=(8, 8, 1),
                                     gradient=mode)
            model.compile(keras.optimizers.SGD(0.05), "sparse_categorical_crossentropy",
                          jit_compile=False)
        return model.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0).history["loss"]
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    print(json.dumps({mode: run(strategy, mode) for mode in ("adjoint", "backprop")}))
""")


@pytest.mark.numerics
def test_mirrored_strategy_adjoint_matches_backprop():
    import json

    out = subprocess.run([sys.executable, "-c", MIRRORED], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    losses = json.loads(out.stdout.strip().splitlines()[-1])
    # (Not compared with one device: BatchNorm normalizes per replica, over half the batch.)
    assert losses["adjoint"][-1] < losses["adjoint"][0]
    np.testing.assert_allclose(losses["adjoint"], losses["backprop"], rtol=1e-4)
