"""kode's Keras layers (the core, with :mod:`kode.integrators` and :mod:`kode.gradients`).

- :class:`IntegratorStage`: N residual steps of an integrator on a state of fixed shape, with
  a gradient mode (backprop, checkpoint, adjoint); :class:`TransitionBlock`: the
  shape-changing block between stages; :class:`RecomputedSegment`: layers outside the stages
  (a ported model's stem, shape-changing blocks, head) recomputed in the backward.
- Residual functions: :class:`BasicBlock`, :class:`Bottleneck`, :class:`Projection`,
  :class:`StochasticDepth`, :class:`LayerChain` (the branch of a ported model's block).
- :class:`BatchNormalization` on TensorFlow's fused kernel; RevNet's coupling layers.

Importing this package registers every layer with Keras' serialization, so
``keras.saving.load_model`` reads kode models.
"""

from kode.layers.blocks import BasicBlock, Bottleneck, Projection, StochasticDepth
from kode.layers.chain import LayerChain
from kode.layers.normalization import BatchNormalization
from kode.layers.revnet import HalvesPoolPad, RevNetDownsampleFunction
from kode.layers.segment import Recomputable, RecomputedSegment
from kode.layers.stage import (
    IntegratorStage,
    TransitionBlock,
    integrator_stages,
    recomputable_layers,
    resolve_step_size,
    set_gradient_mode,
)

__all__ = [
    "BasicBlock", "BatchNormalization", "Bottleneck", "HalvesPoolPad", "IntegratorStage",
    "LayerChain", "Projection", "Recomputable", "RecomputedSegment",
    "RevNetDownsampleFunction", "StochasticDepth", "TransitionBlock", "integrator_stages",
    "recomputable_layers", "resolve_step_size", "set_gradient_mode",
]
