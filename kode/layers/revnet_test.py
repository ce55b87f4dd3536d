"""Layer cases of :mod:`kode.layers.revnet`: Keras' harness, per-layer dtype policies and the
checkpoint round trip (:mod:`kode.testing.layers`)."""

from __future__ import annotations

from kode.layers.blocks import BasicBlock
from kode.layers.blocks_test import X
from kode.layers.revnet import HalvesPoolPad, RevNetDownsampleFunction
from kode.testing.layers import layer_contract_tests, register_layer_case

CASES = [
    register_layer_case("revnet_halves_pool_pad", lambda **kw: HalvesPoolPad(8, 2, **kw), X,
                        expected_output_shape=(2, 2, 2, 8)),
    register_layer_case(
        "revnet_downsample_function",
        lambda dtype=None, **kw: RevNetDownsampleFunction(
            BasicBlock(4, 2, dtype=dtype), BasicBlock(4, dtype=dtype), 8, 2, dtype=dtype, **kw),
        X, expected_output_shape=(2, 2, 2, 8)),
]

test_keras_run_layer_test, test_per_layer_dtype_policy, test_checkpoint_round_trip = (
    layer_contract_tests(CASES))
