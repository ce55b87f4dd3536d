"""Layer cases of :mod:`kode.layers.chain`: Keras' harness, per-layer dtype policies and the
checkpoint round trip (:mod:`kode.testing.layers`)."""

from __future__ import annotations

import keras

from kode.layers.blocks_test import X
from kode.layers.chain import LayerChain
from kode.layers.normalization import BatchNormalization
from kode.layers.stage import IntegratorStage
from kode.testing.layers import layer_contract_tests, register_layer_case


def _chain(dtype=None, **kwargs):
    return LayerChain([BatchNormalization(dtype=dtype), keras.layers.ReLU(dtype=dtype),
                       keras.layers.Conv2D(4, 3, padding="same", dtype=dtype)],
                      dtype=dtype, **kwargs)


CASES = [
    register_layer_case("layer_chain", _chain, X),
    register_layer_case("stage_of_layer_chains_euler", lambda dtype=None, **kw: IntegratorStage(
        [_chain(dtype) for _ in range(2)], "euler", dtype=dtype, **kw), X),
]

test_keras_run_layer_test, test_per_layer_dtype_policy, test_checkpoint_round_trip = (
    layer_contract_tests(CASES))
