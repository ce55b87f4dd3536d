"""Layer cases of :mod:`kode.layers.normalization`: Keras' harness, per-layer dtype policies and the
checkpoint round trip (:mod:`kode.testing.layers`)."""

from __future__ import annotations

from kode.layers.blocks_test import X
from kode.layers.normalization import BatchNormalization
from kode.testing.layers import layer_contract_tests, register_layer_case

CASES = [
    register_layer_case("fused_batch_norm", lambda **kw: BatchNormalization(momentum=0.9, **kw),
                        X),
]

test_keras_run_layer_test, test_per_layer_dtype_policy, test_checkpoint_round_trip = (
    layer_contract_tests(CASES))
