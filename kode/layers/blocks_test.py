"""Layer cases of :mod:`kode.layers.blocks`: Keras' harness, per-layer dtype policies and the
checkpoint round trip (:mod:`kode.testing.layers`)."""

from __future__ import annotations

from kode.layers.blocks import BasicBlock, Bottleneck, Projection, StochasticDepth
from kode.testing.layers import layer_contract_tests, register_layer_case

X = (2, 4, 4, 4)  # small shapes: every case runs in seconds (a compiled fit step included)


def stochastic_depth(f, i, dtype):
    return StochasticDepth(f, 0.6, seed=i, dtype=dtype)


CASES = [
    register_layer_case("basic_block", lambda **kw: BasicBlock(4, **kw), X),
    register_layer_case("bottleneck_grouped_stride2",
                        lambda **kw: Bottleneck(4, 8, stride=2, groups=2, **kw), X,
                        expected_output_shape=(2, 2, 2, 8)),
    register_layer_case("projection", lambda **kw: Projection(8, 2, **kw), X,
                        expected_output_shape=(2, 2, 2, 8)),
    register_layer_case(
        "stochastic_depth",
        lambda dtype=None, **kw: stochastic_depth(BasicBlock(4, dtype=dtype), 0, dtype), X),
]

test_keras_run_layer_test, test_per_layer_dtype_policy, test_checkpoint_round_trip = (
    layer_contract_tests(CASES))
