""""""

from __future__ import annotations

import keras

from kode.layers.blocks import BasicBlock, Bottleneck, Projection, StochasticDepth
from kode.layers.chain import LayerChain
from kode.layers.normalization import BatchNormalization
from kode.layers.revnet import HalvesPoolPad, RevNetDownsampleFunction
from kode.layers.stage import IntegratorStage, TransitionBlock
from kode.testing.layers import register_layer_case

# The kode layers. Small shapes: every case runs in seconds (a compiled fit step included).
_X = (2, 4, 4, 4)


def _stage(integrator, functions: int = 2, wrap=None, width: int = 4, **stage_kwargs):
    def make(dtype=None, **kwargs):
        fns = [BasicBlock(width, dtype=dtype) for _ in range(functions)]
        if wrap is not None:
            fns = [wrap(f, i, dtype) for i, f in enumerate(fns)]
        return IntegratorStage(fns, integrator, dtype=dtype, **stage_kwargs, **kwargs)
    return make


def _stochastic_depth(f, i, dtype):
    return StochasticDepth(f, 0.6, seed=i, dtype=dtype)


register_layer_case("basic_block", lambda **kw: BasicBlock(4, **kw), _X)


register_layer_case("bottleneck_grouped_stride2",
                    lambda **kw: Bottleneck(4, 8, stride=2, groups=2, **kw), _X,
                    expected_output_shape=(2, 2, 2, 8))


register_layer_case("projection", lambda **kw: Projection(8, 2, **kw), _X,
                    expected_output_shape=(2, 2, 2, 8))


register_layer_case(
    "stochastic_depth",
    lambda dtype=None, **kw: _stochastic_depth(BasicBlock(4, dtype=dtype), 0, dtype), _X)


register_layer_case(
    "transition",
    lambda dtype=None, **kw: TransitionBlock(BasicBlock(8, 2, dtype=dtype),
                                             Projection(8, 2, dtype=dtype), dtype=dtype, **kw),
    _X, expected_output_shape=((2, 2, 2, 8), (2, 2, 2, 8)))


register_layer_case("stage_euler", _stage("euler"), _X)


register_layer_case("stage_heun_ode_checkpoint",
                    _stage("heun", step_size="ode", gradient="checkpoint"), _X)


register_layer_case("stage_lm_history_checkpoint", _stage("lm", gradient="checkpoint"), (_X, _X),
                    expected_output_shape=_X)


register_layer_case("stage_momentum_adjoint", _stage("momentum", gradient="adjoint"), _X)


register_layer_case(
    "stage_reversible_heun_adjoint_stochastic_depth",
    _stage("reversible_heun", functions=3, wrap=_stochastic_depth, gradient="adjoint"), _X)


register_layer_case("stage_polynet", _stage("polynet", step_size="ode"), _X)


register_layer_case("stage_fractalnet_checkpoint", _stage("fractalnet", gradient="checkpoint"), _X)


register_layer_case("stage_revnet_adjoint", _stage("revnet", functions=4, width=2,
                                                   gradient="adjoint"), _X)


register_layer_case("fused_batch_norm", lambda **kw: BatchNormalization(momentum=0.9, **kw), _X)


register_layer_case(
    "layer_chain",
    lambda dtype=None, **kw: LayerChain(
        [BatchNormalization(dtype=dtype), keras.layers.ReLU(dtype=dtype),
         keras.layers.Conv2D(4, 3, padding="same", dtype=dtype)], dtype=dtype, **kw), _X)


register_layer_case("stage_of_layer_chains_euler", lambda dtype=None, **kw: IntegratorStage(
    [LayerChain([BatchNormalization(dtype=dtype), keras.layers.ReLU(dtype=dtype),
                 keras.layers.Conv2D(4, 3, padding="same", dtype=dtype)], dtype=dtype)
     for _ in range(2)], "euler", dtype=dtype, **kw), _X)


register_layer_case("revnet_halves_pool_pad", lambda **kw: HalvesPoolPad(8, 2, **kw), _X,
                    expected_output_shape=(2, 2, 2, 8))


register_layer_case(
    "revnet_downsample_function",
    lambda dtype=None, **kw: RevNetDownsampleFunction(
        BasicBlock(4, 2, dtype=dtype), BasicBlock(4, dtype=dtype), 8, 2, dtype=dtype, **kw),
    _X, expected_output_shape=(2, 2, 2, 8))


register_layer_case("stage_post_activation_euler_checkpoint",
                    _stage("post_activation_euler", gradient="checkpoint"), _X)
