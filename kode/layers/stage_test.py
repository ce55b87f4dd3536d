"""Layer cases of :mod:`kode.layers.stage`: Keras' harness, per-layer dtype policies and the
checkpoint round trip (:mod:`kode.testing.layers`)."""

from __future__ import annotations

from kode.layers.blocks import BasicBlock, Projection
from kode.layers.blocks_test import X, stochastic_depth
from kode.layers.stage import IntegratorStage, TransitionBlock
from kode.testing.layers import layer_contract_tests, register_layer_case


def _stage(integrator, functions: int = 2, wrap=None, width: int = 4, **stage_kwargs):
    def make(dtype=None, **kwargs):
        fns = [BasicBlock(width, dtype=dtype) for _ in range(functions)]
        if wrap is not None:
            fns = [wrap(f, i, dtype) for i, f in enumerate(fns)]
        return IntegratorStage(fns, integrator, dtype=dtype, **stage_kwargs, **kwargs)
    return make


CASES = [
    register_layer_case(
        "transition",
        lambda dtype=None, **kw: TransitionBlock(BasicBlock(8, 2, dtype=dtype),
                                                 Projection(8, 2, dtype=dtype), dtype=dtype, **kw),
        X, expected_output_shape=((2, 2, 2, 8), (2, 2, 2, 8))),
    register_layer_case("stage_euler", _stage("euler"), X),
    register_layer_case("stage_heun_ode_checkpoint",
                        _stage("heun", step_size="ode", gradient="checkpoint"), X),
    register_layer_case("stage_lm_history_checkpoint", _stage("lm", gradient="checkpoint"),
                        (X, X), expected_output_shape=X),
    register_layer_case("stage_momentum_adjoint", _stage("momentum", gradient="adjoint"), X),
    register_layer_case(
        "stage_reversible_heun_adjoint_stochastic_depth",
        _stage("reversible_heun", functions=3, wrap=stochastic_depth, gradient="adjoint"), X),
    register_layer_case("stage_polynet", _stage("polynet", step_size="ode"), X),
    register_layer_case("stage_fractalnet_checkpoint",
                        _stage("fractalnet", gradient="checkpoint"), X),
    register_layer_case("stage_revnet_adjoint",
                        _stage("revnet", functions=4, width=2, gradient="adjoint"), X),
    register_layer_case("stage_post_activation_euler_checkpoint",
                        _stage("post_activation_euler", gradient="checkpoint"), X),
]

test_keras_run_layer_test, test_per_layer_dtype_policy, test_checkpoint_round_trip = (
    layer_contract_tests(CASES))
