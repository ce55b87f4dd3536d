"""kode: residual networks as ODE integrators, for Keras 3 / TensorFlow.

Importing ``kode`` registers its Keras layers, so ``keras.saving.load_model`` can read kode
models after ``import kode``.
"""

from kode._tensorflow import import_tensorflow_quietly, refuse_another_keras_backend

import_tensorflow_quietly()
refuse_another_keras_backend()  # before any kode module imports Keras

from kode.errors import KodeError  # noqa: E402
from kode.gradients import GRADIENT_MODES  # noqa: E402
from kode.integrators import (  # noqa: E402
    INTEGRATORS,
    Euler,
    FractalNet,
    Heun,
    Integrator,
    LinearMultistep,
    Momentum,
    PolyNet,
    PostActivationEuler,
    ReversibleHeun,
    RevNet,
    get_integrator,
)
from kode.layers import (  # noqa: E402
    BasicBlock,
    Bottleneck,
    IntegratorStage,
    LayerChain,
    Projection,
    RecomputedSegment,
    StochasticDepth,
    TransitionBlock,
    set_gradient_mode,
)
from kode.tools.port import port_model  # noqa: E402
from kode.tools.segments import cut_at_stages  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "GRADIENT_MODES", "INTEGRATORS", "BasicBlock", "Bottleneck", "Euler", "Heun", "Integrator",
    "IntegratorStage", "KodeError", "LayerChain", "LinearMultistep", "Momentum",
    "PostActivationEuler", "Projection", "RecomputedSegment", "cut_at_stages", "port_model",
    "ReversibleHeun", "StochasticDepth", "TransitionBlock", "export_model", "get_integrator",
    "check_gradients", "finetune", "load_dataset", "predict_files", "set_gradient_mode",
    "train", "tune",
    "FractalNet", "PolyNet", "RevNet",
]

# The application (training, data, serving) sits above the zoo, which imports kode's layers:
# loaded on first use, so that ``import kode`` stays the core and tools.
_LAZY = {"train": "kode.training.pipeline", "export_model": "kode.serving.export",
         "predict_files": "kode.serving.predict", "load_dataset": "kode.data.datasets",
         "check_gradients": "kode.tools.guard", "finetune": "kode.training.finetune",
         "tune": "kode.training.tuning"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kode' has no attribute '{name}'")
