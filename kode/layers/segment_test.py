"""Layer cases of :mod:`kode.layers.segment`: Keras' harness, per-layer dtype policies and the
checkpoint round trip (:mod:`kode.testing.layers`)."""

from __future__ import annotations

import keras

from kode.layers.blocks_test import X
from kode.layers.normalization import BatchNormalization
from kode.layers.segment import RecomputedSegment
from kode.testing.layers import layer_contract_tests, register_layer_case


def _segment(gradient: str):
    def make(dtype=None, **kwargs):
        inputs = keras.Input(X[1:])
        x = keras.layers.Conv2D(4, 3, strides=2, padding="same", dtype=dtype)(inputs)
        x = BatchNormalization(dtype=dtype)(x)
        outputs = keras.layers.ReLU(dtype=dtype)(x)
        return RecomputedSegment(keras.Model(inputs, outputs), gradient, dtype=dtype, **kwargs)
    return make


CASES = [
    register_layer_case("recomputed_segment_backprop", _segment("backprop"), X),
    register_layer_case("recomputed_segment_adjoint", _segment("adjoint"), X),
]

test_keras_run_layer_test, test_per_layer_dtype_policy, test_checkpoint_round_trip = (
    layer_contract_tests(CASES))
