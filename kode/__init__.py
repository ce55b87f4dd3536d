"""kode: residual networks as ODE integrators, for Keras 3 / TensorFlow."""

from kode.blocks import BasicBlock, Bottleneck, Projection, StochasticDepth
from kode.errors import KodeError
from kode.integrators import (
    INTEGRATORS,
    Euler,
    Heun,
    Integrator,
    LinearMultistep,
    Momentum,
    ReversibleHeun,
    get_integrator,
)
from kode.stage import IntegratorStage, TransitionBlock

__version__ = "0.1.0"

__all__ = [
    "INTEGRATORS", "BasicBlock", "Bottleneck", "Euler", "Heun", "Integrator", "IntegratorStage",
    "KodeError", "LinearMultistep", "Momentum", "Projection", "ReversibleHeun", "StochasticDepth",
    "TransitionBlock", "get_integrator",
]
