"""Gradient modes everywhere a Keras user trains: fit, saving, export, mixed precision,
MirroredStrategy (in a subprocess: logical devices must be set before TensorFlow starts)."""


import numpy as np
import pytest

import zoo
from kode.scopes import precision_scope
from kode.testing.models import mirrored_fit_losses, run_standard_model_checks


@pytest.mark.parametrize("name, mode", [("revheun_resnet20", "adjoint"),
                                        ("momentum_resnet20", "adjoint"),
                                        ("lm_resnet20", "checkpoint")])
def test_standard_checks_with_memory_saving_gradients(name, mode):
    model = run_standard_model_checks(name, gradient=mode)
    modes = {layer.gradient for layer in model._flatten_layers() if hasattr(layer, "dynamics")}
    assert modes == {mode}


def test_mixed_bfloat16_adjoint_trains():
    with precision_scope("mixed_bfloat16"):
        model = zoo.create_model("revheun_resnet20", depth=8, input_shape=(8, 8, 1),
                                 gradient="adjoint")
        model.compile("sgd", "sparse_categorical_crossentropy", jit_compile=False)
        x = np.random.default_rng(0).standard_normal((16, 8, 8, 1)).astype("float32")
        losses = [model.train_on_batch(x, np.arange(16) % 10) for _ in range(3)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


@pytest.mark.numerics
def test_mirrored_strategy_adjoint_matches_backprop():
    losses = mirrored_fit_losses("revheun_resnet20", epochs=3, depth=8)
    # (Not compared with one device: BatchNorm normalizes per replica, over half the batch.)
    assert losses["adjoint"][-1] < losses["adjoint"][0]
    np.testing.assert_allclose(losses["adjoint"], losses["backprop"], rtol=1e-4)
