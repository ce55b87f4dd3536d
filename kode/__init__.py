"""kode: residual networks as ODE integrators, for Keras 3 / TensorFlow.

Names are imported lazily so that ``kode`` (the CLI) can configure TensorFlow's logging
before TensorFlow loads.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "BasicBlock": "kode.blocks",
    "Bottleneck": "kode.blocks",
    "Projection": "kode.blocks",
    "StochasticDepth": "kode.blocks",
    "KodeError": "kode.errors",
    "INTEGRATORS": "kode.integrators",
    "Integrator": "kode.integrators",
    "Euler": "kode.integrators",
    "Heun": "kode.integrators",
    "LinearMultistep": "kode.integrators",
    "Momentum": "kode.integrators",
    "ReversibleHeun": "kode.integrators",
    "get_integrator": "kode.integrators",
    "IntegratorStage": "kode.stage",
    "TransitionBlock": "kode.stage",
    "train": "kode.training",
    "export_model": "kode.export",
    "predict_files": "kode.export",
    "load_dataset": "kode.data",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kode' has no attribute '{name}'")
